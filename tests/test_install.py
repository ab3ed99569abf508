"""The installed stack is the locked one, and the model stack imports.

A range pin once let torchaudio move to a patch release that does not load
beside torch (an undefined symbol in libtorchaudio.so), and every model op then
answered ``unavailable``. These tests fail loudly, naming the package, when the
environment drifts from ``requirements.lock`` or cannot import the model code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

#: The model stack: each must import, in this order (muq imports torchaudio, transformers, torchvision).
MODEL_STACK = ["torch", "torchaudio", "torchvision", "transformers", "muq", "music2latent"]


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock line {line!r} is not an exact pin"
        pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("module", MODEL_STACK)
def test_model_stack_imports(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # the reason, not just "failed"
        pytest.fail(f"the installed {module} cannot be imported: {type(exc).__name__}: {exc}")


def test_installed_versions_match_the_lock() -> None:
    wrong = []
    for name, version in _locked().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name} is locked at {version} but not installed")
            continue
        if installed.split("+")[0] != version.split("+")[0]:
            wrong.append(f"{name} is {installed}, the lock says {version}")
    assert not wrong, "the environment drifted from requirements.lock (run scripts/bootstrap): " + "; ".join(wrong)


def test_model_stack_is_pinned_exactly_in_pyproject() -> None:
    text = PYPROJECT.read_text(encoding="utf-8")
    for package in ["torch", "torchaudio", "torchvision", "transformers", "muq", "music2latent"]:
        match = re.search(rf'"{package}([^"]*)"', text)
        assert match, f"pyproject.toml does not name {package}"
        assert re.fullmatch(r"==\d+(\.\d+)*", match.group(1)), (
            f"pyproject.toml pins {package} as {match.group(1)!r}; the model stack needs an exact version"
        )


def test_every_dependency_is_in_the_lock() -> None:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    locked = _locked()
    missing = []
    for req in requirements:
        name = _norm(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])
        if name not in locked:
            missing.append(name)
    assert not missing, f"not in requirements.lock (run scripts/lock): {', '.join(missing)}"
