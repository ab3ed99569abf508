"""Precision per model: stored-vector cosine to fp32 and speed, on the same weights and input.

Loads each model once through embedd's backend (as the daemon does), embeds
the same synthetic track in fp32 and in each other precision (autocast, the
daemon's only way of lowering precision), and prints one JSON line per
(model, precision): the cosine of the stored vectors to fp32's, and audio
seconds per second next to fp32's, measured in the same process one after
the other. ``auto`` must pick, per device, only precisions whose cosine is at
least 0.999 (``embedd/models/precision.py``).

    python bench/precision.py --models-dir /tmp/full --seconds 30
    python bench/precision.py --models-dir .cache/tiny-models --precisions bf16 fp16
    python bench/precision.py --models-dir /tmp/full --model mert --quantize   # + int8 vs default

``--quantize`` then loads the model again with ``quantize=int8`` (``embedd/models/quantize.py``)
and prints its cosine and speed next to the default's, in ``auto``'s precision and in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, help="built by tests/tiny_models.py (any preset)")
    parser.add_argument("--model", default="all", choices=["all", "muq", "mert", "latent"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mert-hop-s", type=float, default=None,
                        help="also compare MERT at this hop with the contract's 5 s (fp32, same track)")
    parser.add_argument("--quantize", action="store_true",
                        help="also load each model with quantize=int8 and compare it with the default, "
                             "in the daemon's auto precision and in fp32")
    args = parser.parse_args()

    import numpy as np
    import torch

    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.precision import cpu_has_native_bf16, resolve_precision

    torch.set_num_threads(args.threads)
    sources = json.loads((Path(args.models_dir) / "embedd-models.json").read_text())["models"]
    print(f"# bench/precision.py {time.strftime('%Y-%m-%d')} device {args.device}, native bf16 "
          f"{cpu_has_native_bf16()}, auto -> {resolve_precision('auto', args.device)}, {args.seconds:.0f} s track")
    for name in ["muq", "mert", "latent"] if args.model == "all" else [args.model]:
        model = backend_class(name)(ModelSpec(source=sources[name], device=args.device, precision="fp32"))
        model.load()
        sr, ch = model.info.sample_rate, model.info.channels
        rng = np.random.default_rng(3)
        n = int(args.seconds * sr)
        t = np.arange(n, dtype=np.float32) / sr
        wave = np.stack([(0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
                         for c in range(ch)])

        def run(precision: str) -> tuple[np.ndarray, float]:
            # a model loaded in each precision, as the daemon loads it: Music2Latent converts its weights to
            # bf16 at load (embedd.models.precision), so a spec changed after loading would not be what runs
            nonlocal model
            if model.spec.precision != precision:
                spec = dataclasses.replace(model.spec, precision=precision)
                model.unload()
                model = backend_class(name)(spec)
                model.load()
            model.embed_audio_many([wave[:, : min(n, 5 * sr)]])  # warm-up: kernels for this precision
            started = time.perf_counter()
            [emb] = model.embed_audio_many([wave])
            return emb.vector, args.seconds / (time.perf_counter() - started)

        ref, ref_speed = run("fp32")
        measured = {"fp32": (ref, ref_speed)}
        for precision in args.precisions:
            vec, speed = run(precision)
            measured[precision] = (vec, speed)
            cosine = float(np.dot(ref, vec) / (np.linalg.norm(ref) * np.linalg.norm(vec)))
            print(json.dumps({"model": name, "precision": precision, "cosine_to_fp32": round(cosine, 6),
                              "audio_s_per_s": round(speed, 3), "fp32_audio_s_per_s": round(ref_speed, 3),
                              "speedup": round(speed / ref_speed, 2)}), flush=True)
        if name == "mert" and args.mert_hop_s:
            model.spec = dataclasses.replace(model.spec, hop_s=args.mert_hop_s)
            vec, speed = run("fp32")
            cosine = float(np.dot(ref, vec) / (np.linalg.norm(ref) * np.linalg.norm(vec)))
            print(json.dumps({"model": name, "hop_s": args.mert_hop_s, "cosine_to_5s_hop": round(cosine, 6),
                              "audio_s_per_s": round(speed, 3), "speedup": round(speed / ref_speed, 2)}), flush=True)
            model.spec = dataclasses.replace(model.spec, hop_s=None)
        if args.quantize:
            auto = resolve_precision("auto", args.device)
            if auto not in measured:
                measured[auto] = run(auto)
        model.unload()
        if args.quantize:
            model = backend_class(name)(ModelSpec(source=sources[name], device=args.device, precision="fp32",
                                                  quantize="int8"))
            model.load()
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            quantized = sum(isinstance(m, DynamicLinear) for v in vars(model).values()
                            if isinstance(v, torch.nn.Module) for m in v.modules())
            for precision in dict.fromkeys([auto, "fp32"]):
                vec, speed = run(precision)
                base_vec, base_speed = measured[precision]
                print(json.dumps({"model": name, "quantize": "int8", "precision": precision,
                                  "int8_linears": quantized,
                                  "cosine_to_default": round(float(np.dot(base_vec, vec)), 6),
                                  "cosine_to_fp32": round(float(np.dot(ref, vec)), 6),
                                  "audio_s_per_s": round(speed, 3),
                                  "speedup_vs_same_precision": round(speed / base_speed, 2)}),
                      flush=True)
            model.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
