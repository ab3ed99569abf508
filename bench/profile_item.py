"""Where one item's forward pass spends its time, by kind of op: what stands between a model and the matmul peak.

Loads a model at real size (random weights, ``tests/tiny_models.py DIR --preset
full``) through embedd's own backend, in the precision the daemon would use
(``auto``), cuts the first item of a music-like four-minute track (as
``bench/compiled.py``), runs it once to warm up, then once under
``torch.profiler`` and prints each kind's share of the pass's CPU time:
matmul and convolution (what a peak measures), normalisation, elementwise
activations and arithmetic, dtype casts and copies, and the rest, with the
top ops of each.

    .venv/bin/python bench/profile_item.py --models-dir /tmp/full --model latent
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KINDS = {
    "matmul/conv": ("mm", "bmm", "addmm", "matmul", "linear", "conv", "mkldnn", "onednn", "baddbmm", "attention", "_flash"),
    "norm": ("norm", "group_norm", "layer_norm", "batch_norm"),
    "cast/copy": ("copy_", "to", "_to_copy", "contiguous", "clone", "cat", "stack", "pad", "reshape", "view", "permute", "transpose"),
    "elementwise": ("silu", "gelu", "relu", "sigmoid", "tanh", "mul", "add", "sub", "div", "exp", "sqrt", "rsqrt", "pow", "softmax", "mean", "sum", "where", "clamp", "neg", "abs", "sin", "cos"),
}


def kind_of(name: str) -> str:
    op = name.split("::")[-1].lower()
    for kind, keys in KINDS.items():
        if any(op == k or op.startswith(k + "_") or op.startswith("_" + k) or (len(k) > 3 and k in op) for k in keys):
            return kind
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--model", default="latent", choices=["muq", "mert", "latent"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import flops
    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.memory import default_budget_bytes
    from embedd.models.precision import resolve_precision

    torch.set_num_threads(args.threads)
    sources = json.loads((args.models_dir / "embedd-models.json").read_text())["models"]
    precision = resolve_precision("auto", args.device)
    spec = ModelSpec(source=sources[args.model], device=args.device, precision=precision,
                     memory_budget=default_budget_bytes(args.device))  # fmt: skip
    model = backend_class(args.model)(spec)
    model.load()
    adapter = flops.ADAPTERS[args.model]
    item = flops.record_layout(model, adapter, flops.music_like_track(model, 240.0)).items[0]
    with model.forward_context():
        model._forward([item])  # warm-up: oneDNN primitives, allocator
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model._forward([item])
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    by_kind: dict[str, float] = collections.Counter()
    tops: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for e in events:
        kind = kind_of(e.key)
        by_kind[kind] += e.self_cpu_time_total
        tops[kind].append((e.self_cpu_time_total, e.key))
    total = sum(by_kind.values())
    print(f"{args.model}, one item, {precision}, {args.threads} threads: {total / 1e6:.2f} s of aten self time")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        top = ", ".join(f"{k.split('::')[-1]} {v / total:.0%}" for v, k in sorted(tops[kind], reverse=True)[:4])
        print(f"  {kind:12} {t / total:6.1%}   {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
