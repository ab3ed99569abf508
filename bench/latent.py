"""Music2Latent on a CPU: what the chunking pads, and which convolution path is fastest.

Random weights of the released architecture (``python tests/tiny_models.py DIR
--preset full``), loaded through embedd's backend. Three parts, each printed as
JSON lines; every speed is a ratio of runs made one after the other in this
process, so a busy machine slows both sides alike:

1. **Layout** (no model run): per track length, the representation frames the
   encoder processes with near-equal chunks (:func:`embedd.models.latent.chunk_frames`,
   the backend's layout) and with the earlier cut-at-10-s layout (last chunk padded
   to full length), next to the track's own frames.
2. **Chunking, end to end**: one track embedded with each layout in the
   daemon's precision; seconds and the stored vectors' cosine to each other.
3. **Convolution paths** on one batch item (one chunk channel as the backend cuts
   it): bf16 autocast as the daemon runs it, then the same with the encoder and
   its input in ``channels_last``, optionally with oneDNN (``torch.backends.mkldnn``) off,
   with the weights converted to bf16 instead of autocast, and optionally
   ``torch.jit`` trace+freeze and ``torch.compile``; seconds and the latent's
   cosine to fp32.

    python bench/latent.py --models-dir /tmp/embedd/fullmodels
    python bench/latent.py --models-dir /tmp/embedd/fullmodels --seconds 30 --skip-e2e --jit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from embedd.models import latent as latent_module  # noqa: E402


def old_chunk_frames(frames: int, max_frames: int, down: int) -> int:
    """The earlier layout: cut at ``max_frames``, the last chunk padded to full length."""
    return min(frames, max_frames)


@contextlib.contextmanager
def layout(chunking: Callable[[int, int, int], int]) -> Iterator[None]:
    saved = latent_module.chunk_frames
    latent_module.chunk_frames = chunking
    try:
        yield
    finally:
        latent_module.chunk_frames = saved


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def track(sr: int, seconds: float, seed: int = 7) -> np.ndarray:
    """Stereo tones plus noise: not silence, so every layer's activations are non-trivial."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n, dtype=np.float32) / sr
    return np.stack([(0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
                      + 0.05 * rng.standard_normal(n)).astype(np.float32) for c in range(2)])


def frames_of(model, samples: int) -> tuple[int, int, int]:
    """``(frames, max_frames, down)`` of a track of ``samples`` as the backend crops it."""
    hop, down, max_frames, _ = model._constants()
    cropped = ((((samples - 3 * hop) // hop) // down) * hop * down) + 3 * hop
    return (cropped - 4 * hop) // hop + 1, max_frames, down


def processed(frames: int, max_frames: int, down: int, chunking) -> tuple[int, int]:
    """``(chunks per channel, frames processed per channel)`` of a layout."""
    size = chunking(frames, max_frames, down)
    chunks = -(-frames // size)
    return chunks, chunks * size


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    fn()  # warm-up: kernels, oneDNN primitive caches
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def conv_paths(model, item, args: argparse.Namespace, emit) -> None:
    encoder = model._encoder
    with torch.inference_mode():
        rep = torch.stack([model._forward_input(item)])  # type: ignore[attr-defined]
    frames = int(rep.shape[-1])

    def run(enc, x, precision: str) -> torch.Tensor:
        with torch.inference_mode():
            if precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return enc(x).float()
            return enc(x).float()

    ref_s, ref = timed(lambda: run(encoder, rep, "fp32"), 1)
    base_s, base = timed(lambda: run(encoder, rep, "bf16"), args.repeats)
    emit({"part": "conv", "path": "fp32", "seconds": round(ref_s, 3), "frames": frames})
    emit({"part": "conv", "path": "bf16 autocast (daemon)", "seconds": round(base_s, 3),
          "cosine_to_fp32": round(cosine(ref, base), 6), "vs_daemon": 1.0})

    def variant(name: str, fn: Callable[[], torch.Tensor]) -> None:
        try:
            s, out = timed(fn, args.repeats)
        except Exception as exc:  # a path this torch build lacks: say so, keep going
            emit({"part": "conv", "path": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        emit({"part": "conv", "path": name, "seconds": round(s, 3), "cosine_to_fp32": round(cosine(ref, out), 6),
              "vs_daemon": round(base_s / s, 3)})

    # channels_last: encoder weights and input in NHWC
    cl = encoder.to(memory_format=torch.channels_last)
    variant("bf16 autocast + channels_last", lambda: run(cl, rep.contiguous(memory_format=torch.channels_last), "bf16"))
    encoder.to(memory_format=torch.contiguous_format)

    def no_mkldnn() -> torch.Tensor:
        with torch.backends.mkldnn.flags(enabled=False):
            return run(encoder, rep, "bf16")

    if args.onednn_off:  # the ATen fallback: minutes per item at real size
        variant("bf16 autocast, oneDNN off", no_mkldnn)

    import copy

    half = copy.deepcopy(encoder).to(torch.bfloat16)
    variant("bf16 weights (no autocast)", lambda: run(half, rep.to(torch.bfloat16), "fp32"))
    half_cl = half.to(memory_format=torch.channels_last)
    variant("bf16 weights + channels_last",
            lambda: run(half_cl, rep.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), "fp32"))
    del half, half_cl

    if args.jit:
        def jit_frozen() -> Callable[[], torch.Tensor]:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                traced = torch.jit.freeze(torch.jit.trace(encoder, rep, check_trace=False))
            return lambda: run(traced, rep, "bf16")

        started = time.perf_counter()
        try:
            fn = jit_frozen()
            emit({"part": "conv", "path": "jit trace+freeze", "build_s": round(time.perf_counter() - started, 1)})
            variant("jit trace+freeze, bf16 autocast", fn)
        except Exception as exc:
            emit({"part": "conv", "path": "jit trace+freeze", "error": f"{type(exc).__name__}: {exc}"[:300]})
    if args.compile:
        started = time.perf_counter()
        compiled = torch.compile(encoder, dynamic=False)
        variant("torch.compile, bf16 autocast", lambda: run(compiled, rep, "bf16"))
        emit({"part": "conv", "path": "torch.compile", "build_plus_runs_s": round(time.perf_counter() - started, 1)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", required=True, help="built by tests/tiny_models.py (any preset)")
    ap.add_argument("--seconds", type=float, default=30.0, help="track length of the end-to-end part")
    ap.add_argument("--lengths", type=float, nargs="+", default=[30, 240, 720])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--item-seconds", type=float, default=5.0, help="chunk length for the conv-path part")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-conv", action="store_true")
    ap.add_argument("--onednn-off", action="store_true", help="also time convolutions without oneDNN (slow)")
    ap.add_argument("--jit", action="store_true", help="also try torch.jit trace + freeze")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (inductor; needs a C++ compiler)")
    args = ap.parse_args(argv)

    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.precision import resolve_precision

    torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", "cpu")
    sources = json.loads((Path(args.models_dir) / "embedd-models.json").read_text())["models"]
    model = backend_class("latent")(ModelSpec(source=sources["latent"], device="cpu", precision=precision))
    model.load()
    sr = model.info.sample_rate
    print(f"# bench/latent.py {time.strftime('%Y-%m-%d %H:%M')} threads {args.threads}, precision {precision}")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    for seconds in args.lengths:
        frames, max_frames, down = frames_of(model, int(seconds * sr))
        new_chunks, new = processed(frames, max_frames, down, latent_module.chunk_frames)
        old_chunks, old = processed(frames, max_frames, down, old_chunk_frames)
        emit({"part": "layout", "track_s": seconds, "frames": frames, "chunks": new_chunks,
              "processed_new": new, "processed_old": old, "padding_new": round(1 - frames / new, 4),
              "padding_old": round(1 - frames / old, 4), "work_saved": round(1 - new / old, 4)})

    if not args.skip_e2e:
        wave = track(sr, args.seconds)
        results = {}
        for name, chunking in (("old", old_chunk_frames), ("new", latent_module.chunk_frames)):
            with layout(chunking):
                started = time.perf_counter()
                [emb] = model.embed_audio_many([wave])
                results[name] = (time.perf_counter() - started, emb.vector)
        emit({"part": "e2e", "track_s": args.seconds, "old_s": round(results["old"][0], 2),
              "new_s": round(results["new"][0], 2), "speedup": round(results["old"][0] / results["new"][0], 3),
              "cosine_new_to_old": round(cosine(results["old"][1], results["new"][1]), 6)})

    if not args.skip_conv:
        frames, _, _ = frames_of(model, int(args.item_seconds * sr))
        item = latent_module._Chunk(track(sr, args.item_seconds)[0], 0, frames, 0)
        model._forward_input = lambda chunk: _representation(model, chunk)  # type: ignore[attr-defined]
        conv_paths(model, item, args, emit)
    model.unload()
    return 0


def _representation(model, chunk) -> torch.Tensor:
    """The encoder input of one chunk, as the backend's ``_forward`` builds it."""
    from music2latent.audio import to_representation_encoder

    return to_representation_encoder(model._samples(chunk.audio, chunk.start, chunk.frames))[0]


if __name__ == "__main__":
    raise SystemExit(main())
