"""Compiled forward passes (``compile`` setting): the same vectors, compiled once per host, never in the way.

The models are the tiny random-weight builds of the real architectures,
compiled by the real inductor (minutes of CPU on a 2-core box, so each test
compiles only what it checks; the real-size speed is ``bench/compiled.py``'s). Each test has an inductor cache of its own: every first
compile here is a cold one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.audio_fixtures import encode, tone
from tests.conftest import REPO, model_args
from tests.daemon import Daemon, short_tmpdir


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _vector(response: dict, model: str) -> np.ndarray:
    assert response.get("ok"), response
    return np.frombuffer(response["result"]["models"][model]["vector"], dtype="<f4")


def _compiled(d: Daemon, model: str, timeout: float = 900.0) -> dict:
    """The model's compilation once it ended (polls ``status``: the compile is a background chore)."""
    deadline = time.monotonic() + timeout
    while True:
        view = d.call("status")["result"]["models"][model]["compile"]
        if view is not None and view["state"] not in ("waiting", "compiling"):
            return view
        assert time.monotonic() < deadline, f"{model} still compiling after {timeout} s: {view}\n{d.log()}"
        time.sleep(0.5)


@pytest.mark.timeout(1200)  # a cold compile: minutes of a loaded 2-core box
def test_a_compiled_model_gives_the_eager_vectors_and_a_restart_finds_it_in_the_cache(tiny_models):
    """Through the daemon: Music2Latent compiled in the background (a cold cache compiles), used for the
    items of its shape, the same vector as with ``compile = off``; after a restart the cache has it all
    (no inductor compilation: no cache miss) and the vector is the same again."""
    root = short_tmpdir("ecp-")
    music = root / "music"
    music.mkdir()
    track = music / "twenty.flac"
    track.write_bytes(encode(tone(44_100, 2, 20.0, freq=220.0), 44_100, container_format="flac", codec="flac"))
    args = [*model_args(tiny_models), "--music-root", str(music), "--latent-chunk-s", "5"]

    def daemon(compile_setting: str) -> Daemon:
        return Daemon(root, args=args, env={"HF_HUB_OFFLINE": "1", "EMBEDD_COMPILE": compile_setting})

    with daemon("on") as d:
        d.call("embed_file", path=str(track), models=["latent"])  # loads it: the compile becomes due
        first = _compiled(d, "latent")
        assert first["state"] == "ready", first
        assert first["cache"]["misses"] >= 1, first  # a cold cache: inductor compiled
        compiled = _vector(d.call("embed_file", path=str(track), models=["latent"]), "latent")
        view = d.call("status")["result"]["models"]["latent"]["compile"]
        assert view["items"] >= 8, view  # 4 full chunks per channel ran compiled
        assert view["shape"][0] == 1
        assert d.call("status")["result"]["models"]["muq"]["compile"] is None  # never loaded: nothing compiled
    assert (root / "data" / "compile-cache").is_dir()

    with daemon("on") as d:
        again = _vector(d.call("embed_file", path=str(track), models=["latent"]), "latent")
        warm = _compiled(d, "latent")
        assert warm["state"] == "ready" and warm["cache"]["misses"] == 0 and warm["cache"]["hits"] >= 1, warm
        after = _vector(d.call("embed_file", path=str(track), models=["latent"]), "latent")
        assert d.call("status")["result"]["models"]["latent"]["compile"]["items"] >= 8

    with daemon("off") as d:
        eager = _vector(d.call("embed_file", path=str(track), models=["latent"]), "latent")
        assert d.call("status")["result"]["models"]["latent"]["compile"] is None

    for name, vector in (("compiled", compiled), ("first after restart", again), ("compiled after restart", after)):
        assert _cosine(vector, eager) >= 0.9999, name


_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
import torch
from embedd.models import backend_class
from embedd.models.base import ModelSpec
from embedd.models.precision import resolve_precision
from tests.audio_fixtures import tone

what, source = sys.argv[1], sys.argv[2]
out = {}
if what == "toy":
    import contextlib
    from torch._dynamo.utils import counters
    from embedd.models.compiled import CompiledForward

    weight = torch.randn(8, 8)
    fn = lambda x: torch.nn.functional.silu(x @ weight).sum(dim=-1)
    cf = CompiledForward("toy", fn, torch.zeros(1, 4, 8), context=contextlib.nullcontext, if_faster=False)
    x, other = torch.randn(3, 4, 8), torch.randn(2, 5, 8)
    out["eager_before"] = bool(torch.equal(cf(x), fn(x))) and cf.items == 0
    cf.compile_now()
    out["state"] = cf.state
    graphs = counters["stats"]["unique_graphs"]
    out["compiled_close"] = bool(torch.allclose(cf(x), fn(x), atol=1e-5))
    out["items_after_match"] = cf.items
    out["other_eager"] = bool(torch.equal(cf(other), fn(other)))
    out["items_after_other"] = cf.items
    out["new_graphs"] = counters["stats"]["unique_graphs"] - graphs
else:
    spec = ModelSpec(source=source, device="cpu", precision=resolve_precision("auto", "cpu"), compile="always")
    backend = backend_class(what)(spec)
    backend.load()
    sr = backend.info.sample_rate
    wave = tone(sr, backend.info.channels, 45.0, freq=330.0) * np.linspace(0.2, 1.0, round(sr * 45.0), dtype=np.float32)
    out["due"] = backend.compile_due
    eager = backend.embed_audio_many([wave])[0].vector.astype(np.float64)  # before the compile: eager
    backend.compile_now()
    out["after_compile"] = backend.compile_view()
    compiled = backend.embed_audio_many([wave])[0].vector.astype(np.float64)
    out["after_embed"] = backend.compile_view()
    out["cosine"] = float(eager @ compiled / (np.linalg.norm(eager) * np.linalg.norm(compiled)))
    backend.unload()
    out["after_unload"] = backend.compile_view()
print("RESULT " + json.dumps(out))
"""


def _in_a_fresh_process(what: str, source: str, cache) -> dict:
    """Compile in a process of its own: inductor's tracing has crashed a pytest process full of other
    tests' threads (Milvus Lite's gRPC server, executors) -- the daemon compiles in its own process too."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", _IN_A_FRESH_PROCESS, what, source], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", ["muq", "mert"])
def test_compiled_muq_and_mert_give_the_eager_vectors(model, tiny_models, tmp_path):
    """The backends' own compile targets, compiled for real: a long track's windows run compiled, same vector."""
    out = _in_a_fresh_process(model, tiny_models[model], tmp_path / "cache")
    assert out["due"]
    assert out["after_compile"]["state"] == "ready" and out["after_compile"]["items"] == 0, out
    assert out["after_embed"]["items"] >= 2, out  # several windows, one by one
    assert out["cosine"] >= 0.9999, out
    assert out["after_unload"] is None


@pytest.mark.timeout(600)
def test_only_the_compiled_shape_runs_compiled_and_no_call_recompiles(tmp_path):
    """Batches of the example's item shape run compiled item by item; any other shape runs eager; none compiles."""
    out = _in_a_fresh_process("toy", "", tmp_path / "cache")
    assert out == {"eager_before": True, "state": "ready", "compiled_close": True, "items_after_match": 3,
                   "other_eager": True, "items_after_other": 3, "new_graphs": 0}, out  # fmt: skip


def test_a_failed_compile_leaves_the_model_eager_and_says_why(monkeypatch):
    import contextlib

    import torch

    from embedd.models.compiled import CompiledForward

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    cf = CompiledForward("toy", lambda x: x * 2, torch.zeros(1, 3), context=contextlib.nullcontext)
    cf.compile_now()
    assert cf.state == "failed" and cf.error == "RuntimeError: no C++ compiler found", cf.view()
    assert not cf.due
    assert torch.equal(cf(torch.ones(1, 3)), torch.full((1, 3), 2.0)) and cf.items == 0
    assert json.dumps(cf.view())  # status carries it as is


def test_compile_modes_follow_the_setting_and_the_device():
    from embedd.models.compiled import compile_mode

    assert compile_mode("off", "latent", "cuda:0") == "off"
    assert compile_mode("on", "muq", "cpu") == "always"
    assert compile_mode("auto", "latent", "cpu", allocator="system") == "if_faster"
    assert compile_mode("auto", "latent", "cpu", allocator="tcmalloc") == "off"  # eager is faster there
    assert compile_mode("on", "latent", "cpu", allocator="jemalloc") == "always"
    assert compile_mode("auto", "muq", "cpu", allocator="system") == "off"
    assert compile_mode("auto", "mert", "cuda:1") == "if_faster"
