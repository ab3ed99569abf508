"""The memory allocator under each model's forward pass, at real size, in one run.

For each allocator this host has (the system's malloc, tcmalloc, jemalloc) and
each model (random weights of the released architectures, built by
``python tests/tiny_models.py DIR --preset full``, loaded through embedd's own
backend in the precision the daemon picks here) a fresh process started the way
the daemon starts itself (``embedd.allocator.Plan.environment``: the library
preloaded, jemalloc's ``MALLOC_CONF``) times the first item the backend cuts
from a music-like four-minute track (a MuQ 10 s clip, a MERT 30 s window, a
Music2Latent 60 s chunk): the better of two passes after a warm-up, with the
process's CPU time in user space and in the kernel, and its page faults, over
those two passes. The first allocator's process also counts the item's FLOPs
(``bench/flops.py``'s counter).

Printed as JSON lines, then a table: seconds per item, the ratio to the
system's malloc, the fraction of the matmul peak of the daemon's precision
(measured first, in the parent, on the same box), the kernel's share of the
CPU time, page faults per pass, peak memory; then the hours a four-minute track
costs per 1,000 tracks with all three models (model time only).

    python bench/allocator.py --models-dir /tmp/full
    python bench/allocator.py --models-dir /tmp/full --models latent --allocators system tcmalloc
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TRACK_S = 240.0


def child(args: argparse.Namespace) -> dict:
    """One process on one allocator: load, (count,) time one item with its CPU time and faults."""
    import flops
    from embedd.allocator import running

    loaded = flops.load_real_size(args.models_dir, args.model, "cpu", args.threads, TRACK_S)
    model, layout, precision = loaded.model, loaded.layout, loaded.precision
    adapter = flops.ADAPTERS[args.model]
    item = layout.items[0]
    out: dict = {"model": args.model, "allocator": running(), "precision": precision,
                 "items_per_track": len(layout.items)}  # fmt: skip
    if args.count:
        out["gflop_item"] = round(flops.count_item(model, adapter, item)["counted"] / 1e9, 2)
    with model.forward_context():  # the warm-up: its first touch of fresh memory is no allocator's cost
        model._forward([item])
    before = resource.getrusage(resource.RUSAGE_SELF)
    out["s_item"] = round(flops.time_item(model, item, precision, warm=False), 3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    out["user_s"], out["sys_s"] = round(user, 2), round(system, 2)
    out["faults_per_pass"] = (after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt) // 2
    out["hwm_mb"] = round(flops.peak_rss_mb())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, type=Path, help="built by tests/tiny_models.py --preset full")
    parser.add_argument("--models", nargs="+", default=["muq", "mert", "latent"])
    parser.add_argument("--allocators", nargs="+", default=["system", "tcmalloc", "jemalloc"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--peak-repeats", type=int, default=20, help="the peak is the best of these matmuls")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    import torch

    import flops
    from embedd.allocator import Plan, find_library
    from embedd.models.precision import resolve_precision

    torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", "cpu")
    peak = flops.measure_peaks(torch.device("cpu"), [precision], args.peak_n, args.peak_repeats)[precision]
    print(json.dumps({"kind": "peak", "precision": precision, "gflops": round(peak / 1e9, 1)}), flush=True)
    plans = []
    for name in args.allocators:
        library = None if name == "system" else find_library(name)
        if name != "system" and library is None:
            print(json.dumps({"allocator": name, "skipped": "not on this host"}), flush=True)
            continue
        plans.append(Plan(name, library))  # type: ignore[arg-type]
    results: dict[tuple[str, str], dict] = {}
    for model in args.models:
        gflop = None
        for i, plan in enumerate(plans):
            cmd = [sys.executable, __file__, "--models-dir", str(args.models_dir), "--threads", str(args.threads),
                   "--model", model] + (["--count"] if i == 0 else [])  # fmt: skip
            done = subprocess.run(cmd, env=plan.environment(os.environ), capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(json.dumps({"model": model, "allocator": plan.name, "failed": done.stderr[-2000:]}), flush=True)
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            if result["allocator"] != plan.name:
                result["error"] = f"ran on {result['allocator']}, not {plan.name}"
            gflop = result.get("gflop_item", gflop)
            result["gflop_item"] = gflop
            print(json.dumps(result), flush=True)
            results[model, plan.name] = result

    print(f"\nmatmul peak: {precision} {peak / 1e9:.0f} GFLOP/s; {args.threads} threads")
    print(f"{'model':7} {'allocator':9} {'s/item':>7} {'vs system':>9} {'of peak':>8} {'kernel CPU':>10} "
          f"{'faults/pass':>11} {'peak MB':>8}")  # fmt: skip
    hours: dict[str, float] = {}
    for (model, name), r in results.items():
        base = results.get((model, "system"), r)["s_item"]
        share = r["gflop_item"] * 1e9 / r["s_item"] / peak if r.get("gflop_item") else float("nan")
        kernel = r["sys_s"] / max(r["user_s"] + r["sys_s"], 1e-9)
        print(f"{model:7} {name:9} {r['s_item']:7.2f} {base / r['s_item']:8.2f}x {share:8.3f} {kernel:10.0%} "
              f"{r['faults_per_pass']:11d} {r['hwm_mb']:8d}")  # fmt: skip
        hours[name] = hours.get(name, 0.0) + r["s_item"] * r["items_per_track"] * 1000 / 3600
    if set(args.models) == {"muq", "mert", "latent"}:
        print("\nall three, four-minute tracks, model time on this box, hours per 1,000: "
              + ", ".join(f"{name} {h:.0f}" for name, h in hours.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
