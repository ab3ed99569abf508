from __future__ import annotations

import shutil

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
