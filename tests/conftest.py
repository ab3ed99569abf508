from __future__ import annotations

import pytest

from tests.daemon import Daemon, short_tmpdir


@pytest.fixture
def sock_dir():
    """A short temporary directory for socket paths (tmp_path can exceed 107 bytes)."""
    import shutil

    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(sock_dir):
    """A real daemon process on its own socket; stopped (SIGTERM) afterwards."""
    d = Daemon(sock_dir)
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def shared_daemon():
    """One daemon for a whole test module, for tests that do not change its state."""
    import shutil

    root = short_tmpdir()
    d = Daemon(root, args=["--max-frame", "65536"])
    d.start()
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)
