"""Music2Latent's encoder in bf16 end to end, against autocast: does keeping activations in bf16 pay?

Autocast runs each convolution in bf16 but casts around every GroupNorm (kept
in fp32), so a pass reads and writes its activations in both widths; the
profile in BENCHMARKS.md puts casts and copies at 15 % of a pass and the
memory-bound norms and activations at half. This bench times one real-size item
(the first 60 s chunk of a music-like four-minute track, random weights of the
stock architecture) four ways in one process, and compares each output with
fp32's:

* ``fp32``: no autocast (the reference);
* ``autocast``: what the daemon runs today (``precision = bf16``);
* ``bf16``: the encoder's weights and the input in bf16, no autocast (norms in
  bf16 storage, fp32 accumulation inside PyTorch's kernels);
* ``bf16 compiled``: the same through ``torch.compile`` (inductor fuses norm,
  SiLU and the residual add in bf16).

    .venv/bin/python bench/latent_bf16.py --models-dir /tmp/full
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--gflop", type=float, default=2810.0,
                        help="FLOPs of the item (bench/flops.py counts 2810 GFLOP for the stock 60 s chunk)")
    args = parser.parse_args()

    import torch

    import flops
    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.memory import default_budget_bytes

    torch.set_num_threads(args.threads)
    sources = json.loads((args.models_dir / "embedd-models.json").read_text())["models"]
    spec = ModelSpec(source=sources["latent"], device="cpu", precision="fp32", memory_budget=default_budget_bytes("cpu"))
    model = backend_class("latent")(spec)
    model.load()
    item = flops.record_layout(model, flops.ADAPTERS["latent"], flops.music_like_track(model, 240.0)).items[0]
    from music2latent.audio import to_representation_encoder

    rep = torch.stack([to_representation_encoder(model._samples(item.audio, item.start, item.frames))[0]])
    encoder = model._encoder
    peak = flops.matmul_peak(torch.device("cpu"), torch.bfloat16, 2048, 5)

    def timed(fn, passes: int = 2):
        with torch.inference_mode():
            out = fn()  # warm-up (and the compile, for the compiled one)
            best = float("inf")
            for _ in range(passes):
                t0 = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t0)
        return out.float(), best

    ref, t_fp32 = timed(lambda: encoder(rep), passes=1)

    def autocast_pass():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(rep)

    results = {"fp32": (ref, t_fp32)}
    results["autocast"] = timed(autocast_pass)
    bf16 = copy.deepcopy(encoder).to(torch.bfloat16)
    rep16 = rep.to(torch.bfloat16)
    results["bf16"] = timed(lambda: bf16(rep16))
    if not args.no_compile:
        compiled = torch.compile(bf16, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(rep16)
        compile_s = time.perf_counter() - t0
        results["bf16 compiled"] = timed(lambda: compiled(rep16))
        print(f"bf16 compile (first call): {compile_s:.0f} s")

    flat_ref = ref.flatten()
    base = results["autocast"][1]
    print(f"Music2Latent encoder, one 60 s chunk ({args.gflop:.0f} GFLOP), {args.threads} threads; "
          f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s in this run")
    print(f"{'way':16} {'s/item':>8} {'vs autocast':>12} {'of bf16 peak':>13} {'cos to fp32':>12} {'worst frame':>12}")
    for name, (out, seconds) in results.items():
        cos = torch.nn.functional.cosine_similarity(out.flatten(), flat_ref, dim=0).item()
        per_frame = torch.nn.functional.cosine_similarity(out[0], ref[0], dim=0).min().item()
        share = args.gflop * 1e9 / seconds / peak
        print(f"{name:16} {seconds:8.2f} {base / seconds:11.2f}x {share:13.3f} {cos:12.6f} {per_frame:12.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
