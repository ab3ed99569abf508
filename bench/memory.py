"""Peak memory and speed per model at real size: one fresh process per (model, track length).

Each run builds nothing: it loads a model directory made by
``python tests/tiny_models.py --preset full`` (random weights of the released
architectures) through embedd's own backend, as the daemon does, embeds one
synthetic track of the given length and prints one JSON line:

- ``weights_mb``: RSS after loading (the weights plus the interpreter and torch);
  ``load_peak_mb`` the high-water mark of loading itself (then reset);
- ``peak_mb``: the process's high-water mark (VmHWM) while embedding;
- ``activations_mb``: the difference, what the forward passes added on top;
- ``audio_s_per_s``: audio seconds embedded per wall-clock second (2 torch threads
  unless ``--threads``).

    python bench/memory.py --models-dir /tmp/full --model latent --seconds 30 180 720
    python bench/memory.py --models-dir /tmp/full --model all --seconds 30 180 --precision auto

The budget (``--budget-mb``, default the daemon's own) is what each backend
sizes its passes from; the claim under test is ``peak <= weights + budget +
baseline`` whatever the length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def run_one(args: argparse.Namespace) -> dict[str, object]:
    import numpy as np
    import torch

    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.memory import MiB, default_budget_bytes
    from embedd.models.precision import resolve_precision

    torch.set_num_threads(args.threads)
    sources = json.loads((Path(args.models_dir) / "embedd-models.json").read_text())["models"]
    budget = int(args.budget_mb * MiB) if args.budget_mb else default_budget_bytes("cpu")
    precision = resolve_precision(args.precision, "cpu")
    spec = ModelSpec(source=sources[args.model], device="cpu", precision=precision, memory_budget=budget)
    model = backend_class(args.model)(spec)
    model.load()
    sr, ch = model.info.sample_rate, model.info.channels
    rng = np.random.default_rng(0)
    n = int(args.seconds[0] * sr)
    t = np.arange(n, dtype=np.float32) / sr
    wave = np.stack([0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n).astype(np.float32)] * ch)
    weights = _status_mb("VmRSS")
    load_peak = _status_mb("VmHWM")
    # forget the loading spike (reading the checkpoint next to the built model), so the
    # high-water mark below is the embedding's own
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    [emb] = model.embed_audio_many([wave])
    wall = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    return {
        "model": args.model,
        "seconds": args.seconds[0],
        "precision": precision,
        "budget_mb": round(budget / MiB),
        "weights_mb": round(weights),
        "load_peak_mb": round(load_peak),
        "peak_mb": round(peak),
        "activations_mb": round(peak - weights),
        "wall_s": round(wall, 1),
        "audio_s_per_s": round(args.seconds[0] / wall, 3),
        "finite_unit_norm": bool(np.isfinite(emb.vector).all() and abs(float(np.linalg.norm(emb.vector)) - 1) < 1e-3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, help="a directory built by tests/tiny_models.py --preset full")
    parser.add_argument("--model", default="all", choices=["all", "muq", "mert", "latent"])
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0, 180.0, 720.0])
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--budget-mb", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    print(f"# bench/memory.py {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, {args.threads} torch threads")
    models = ["muq", "mert", "latent"] if args.model == "all" else [args.model]
    for model in models:
        for seconds in args.seconds:
            cmd = [sys.executable, __file__, "--one", "--models-dir", args.models_dir, "--model", model,
                   "--seconds", str(seconds), "--precision", args.precision, "--threads", str(args.threads)]
            if args.budget_mb:
                cmd += ["--budget-mb", str(args.budget_mb)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1:] or [json.dumps({"model": model, "seconds": seconds, "error": out.stderr[-400:]})]
            print(line[0], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
