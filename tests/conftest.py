from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import threading

import pytest

from tests.daemon import Daemon, short_tmpdir
from tests.milvus_fixtures import milvus_server  # noqa: F401  (a real Milvus server, one per session)


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


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, str]:
    """Tiny random-weight models of the real architectures (built once, cached under .cache/)."""
    from tests.tiny_models import build_tiny_models

    return build_tiny_models(REPO / ".cache" / "tiny-models")


def model_args(models: dict[str, str]) -> list[str]:
    """The serve flags that point a daemon at the tiny models."""
    return ["--muq-model", models["muq"], "--mert-model", models["mert"], "--latent-model", models["latent"]]


@pytest.fixture(scope="session")
def real_models(tiny_models) -> dict[str, str]:
    """Tiny MuQ, plus the real-size Music2Latent and MERT architectures (random weights)."""
    from tests.tiny_models import PRESETS, _build_latent, _build_mert

    root = REPO / ".cache" / "real-size-models"
    latent = root / "music2latent" / "music2latent.pt"
    mert = root / "mert"
    stamp = root / "built"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        _build_latent(latent, PRESETS["full"], 7)
        _build_mert(mert, PRESETS["full"], 8)
        stamp.write_text("ok")
    return {**tiny_models, "tiny_mert": tiny_models["mert"], "latent": str(latent), "mert": str(mert)}


#: How long the test process may take to exit once the session has ended (atexit handlers, threads).
EXIT_GRACE_S = 180.0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A watchdog on the process's own exit, so that a stuck exit can never hold CI until its deadline.

    Past :data:`EXIT_GRACE_S` after the session it prints every thread's stack
    and the processes still left beside it (what held the exit), then leaves
    with the session's status: the test results stand, and the log says what
    hung.
    """

    def give_up() -> None:
        print(f"\ntests: the process has not exited {EXIT_GRACE_S:.0f} s after the session ended; "
              "its threads, then its child processes:", file=sys.stderr, flush=True)  # fmt: skip
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for pid in _children(os.getpid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
                print(f"  {pid}: {command[:200]}", file=sys.stderr)
            except OSError:
                pass
        sys.stderr.flush()
        os._exit(int(exitstatus))

    watchdog = threading.Timer(EXIT_GRACE_S, give_up)
    watchdog.daemon = True  # runs while the interpreter waits for other threads and atexit handlers
    watchdog.start()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []
