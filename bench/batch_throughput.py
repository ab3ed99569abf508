"""Batch-job throughput next to its two limits, and the daemon's memory over a 20,000-row library.

Part 1 (in-process, one ``Service`` for all three numbers, same settings):

* decode-only: every row's file decoded to all selected models' targets, with
  the pipeline's decode concurrency (``decode_workers + DECODE_PREFETCH``);
* model-only: waveforms decoded beforehand, every row embedded by every model
  through the executor's BATCH lane with the pipeline's permits;
* batch: a real job (``batch_start`` through the manager) over the same rows,
  into Milvus Lite.

It prints tracks/s of each and ``efficiency = batch / min(decode, model)``.
The batch rate is taken over the steady state (first to last settled track);
the wall time including set-up (Milvus collections, the incremental scan) is
printed beside it. On a CPU-only box decoding and the models compete for the
same cores, so there the pipeline cannot reach the smaller of two numbers
each measured with the whole machine to itself; on a GPU host they overlap.

Part 2 (a daemon subprocess): a 20,000-row library whose rows point at a few
real files, a job over it for ``--rss-seconds``; the daemon's RSS is sampled
and printed against tracks processed, with its peak (VmHWM). Flat RSS while
the processed count grows is the "never holds the library" property.

    python bench/batch_throughput.py [--rows 300] [--files 30] [--seconds 5] [--rss-rows 20000]
    # real size (random weights of the released architectures), a few minutes on a 2-core CPU:
    python bench/batch_throughput.py --preset full --models-dir /tmp/embedd/fullmodels \
        --rows 3 --files 3 --seconds 30 --skip-rss [--models muq]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.batch_fixtures import BatchDaemon, Library  # noqa: E402
from tests.daemon import short_tmpdir  # noqa: E402
from tests.tiny_models import build_models  # noqa: E402

MODELS = ("muq", "mert", "latent")


def _settings(root: Path, lib: Library, models: dict[str, str], decode_workers: int, device: str):
    from embedd.settings import build_settings

    return build_settings(
        {
            "socket": str(root / "s.sock"),
            "data_dir": str(root / "data"),
            "navidrome_db": lib.db.path,
            "muq_model": models["muq"],
            "mert_model": models["mert"],
            "latent_model": models["latent"],
            "decode_workers": decode_workers,
            "device": device,
            "log_level": "warning",
        }
    )


async def _part1(root: Path, lib: Library, models: dict[str, str], rows: int, decode_workers: int, device: str,
                 selected: tuple[str, ...] = MODELS) -> dict:
    from embedd.batch.run import DECODE_PREFETCH
    from embedd.executor import Lane
    from embedd.models import CATALOG
    from embedd.service import Service

    settings = _settings(root, lib, models, decode_workers, device)
    service = Service(settings)
    await service.start()
    try:
        paths = [str(lib.path_of(t)) for t in lib.tracks.values()]
        targets = {(CATALOG[m].sample_rate, CATALOG[m].channels) for m in selected}
        decoder = service.decoder
        await decoder.warm_up()

        # -- decode only
        sem = asyncio.Semaphore(decode_workers + DECODE_PREFETCH)

        async def decode(p: str):
            async with sem:
                return await decoder.decode_path(p, targets)

        t0 = time.perf_counter()
        await asyncio.gather(*(decode(p) for p in paths))
        decode_rate = len(paths) / (time.perf_counter() - t0)

        # -- model only (waveforms of the distinct files decoded beforehand)
        distinct = sorted({str(Path(p).resolve()) for p in paths})
        cache = {p: await decoder.decode_path(p, targets) for p in distinct}
        audio = [cache[str(Path(p).resolve())] for p in paths]
        permits = asyncio.Semaphore(settings.batch_queue)

        async def embed_one(a, model: str):
            info = CATALOG[model]
            async with permits:
                return await service.executor.embed_audio(Lane.BATCH, model, a.waveform(*info.decode_target))

        async def embed_track(a):
            await asyncio.gather(*(embed_one(a, m) for m in selected))

        await embed_track(audio[0])  # load the models
        track_sem = asyncio.Semaphore(decode_workers + DECODE_PREFETCH + -(-settings.batch_queue // len(selected)))

        async def bounded(a):
            async with track_sem:
                await embed_track(a)

        t0 = time.perf_counter()
        await asyncio.gather(*(bounded(a) for a in audio))
        model_rate = len(audio) / (time.perf_counter() - t0)
        del cache, audio

        # -- the batch job
        manager = service.batch
        t0 = time.perf_counter()
        await manager.start_job(list(selected))
        first = last = None
        settled = 0
        while True:
            p = manager.progress_view()
            now = time.perf_counter()
            n = p["processed_tracks"] + p["failed_tracks"] + p["skipped_tracks"]
            if n and first is None:
                first = (now, n)
            if n != settled:
                last, settled = (now, n), n
            if p["status"] not in ("running", "cancelling"):
                break
            await asyncio.sleep(0.02)
        wall = time.perf_counter() - t0
        assert p["status"] == "completed", p
        # first-to-last settle means something only over several settles: a job of a few tracks
        # has them all in flight at once and settles them together (then the wall rate is used)
        few = not (last and first and last[1] - first[1] >= 4 and last[0] > first[0])
        steady = rows / wall if few else (last[1] - first[1]) / (last[0] - first[0])
        return {
            "rows": rows,
            "decode_rate": decode_rate,
            "model_rate": model_rate,
            "batch_rate": steady,
            "batch_wall_rate": rows / wall,
            "batch_wall_s": wall,
            "steady_is_wall": few,
        }
    finally:
        await service.quiesce()
        await service.stop(timeout=5)


def _rss_kb(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _part2(root: Path, models: dict[str, str], rows: int, seconds: float) -> None:
    lib = Library(root / "lib")
    t0 = time.perf_counter()
    lib.add_good(rows, rows_per_file=max(1, rows // 20), duration_s=1.0)
    print(f"built a {rows}-row library over 20 files in {time.perf_counter() - t0:.1f} s")
    d = BatchDaemon(root / "d", lib, models, extra=["--decode-workers", "2"])
    d.start()
    try:
        rss0, _ = _rss_kb(d.proc.pid)
        d.ok("batch_start")
        print(f"{'elapsed_s':>9} {'settled':>8} {'rss_MiB':>8} {'peak_MiB':>8}")
        t0 = time.monotonic()
        samples = []
        next_print = 0.0
        while time.monotonic() - t0 < seconds:
            p = d.progress()
            rss, hwm = _rss_kb(d.proc.pid)
            settled = p["processed_tracks"] + p["failed_tracks"] + p["skipped_tracks"]
            samples.append((settled, rss))
            if time.monotonic() - t0 >= next_print:
                print(f"{time.monotonic() - t0:9.1f} {settled:8d} {rss / 1024:8.1f} {hwm / 1024:8.1f}")
                next_print += max(5.0, seconds / 12)
            if p["status"] not in ("running",):
                break
            time.sleep(0.5)
        d.ok("batch_cancel")
        rss, hwm = _rss_kb(d.proc.pid)
        later = [r for s, r in samples if s >= max(1, samples[-1][0] // 4)]
        early = [r for s, r in samples if 0 < s < max(1, samples[-1][0] // 4)] or later[:1]
        print(
            f"RSS: idle {rss0 / 1024:.0f} MiB; peak {hwm / 1024:.0f} MiB over {samples[-1][0]} settled tracks of {rows}; "
            f"mean RSS first quarter {sum(early) / len(early) / 1024:.0f} MiB, rest {sum(later) / len(later) / 1024:.0f} MiB"
        )
    finally:
        d.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--files", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=5.0, help="audio length of each file")
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/embedd-bench-batch-models"))
    ap.add_argument("--rss-rows", type=int, default=20_000)
    ap.add_argument("--rss-seconds", type=float, default=90.0)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                    help="the models the batch runs (e.g. --models muq: the CPU-host choice)")
    args = ap.parse_args(argv)

    models = build_models(args.models_dir, args.preset)
    root = short_tmpdir("bb-")
    try:
        lib = Library(root / "lib")
        lib.add_good(args.rows, rows_per_file=max(1, args.rows // args.files), duration_s=args.seconds)
        selected = tuple(args.models)
        r = asyncio.run(_part1(root / "p1", lib, models, args.rows, args.decode_workers, args.device, selected))
        limit = min(r["decode_rate"], r["model_rate"])
        print(f"# bench/batch_throughput.py {time.strftime('%Y-%m-%d %H:%M')}, preset {args.preset}")
        print(f"rows {r['rows']} ({args.files} files x {args.seconds:.0f} s audio), "
              f"models {','.join(selected)}, device {args.device}")
        print(f"decode-only   {r['decode_rate']:8.2f} tracks/s")
        print(f"model-only    {r['model_rate']:8.2f} tracks/s")
        kind = "whole job: too few tracks for a steady state" if r["steady_is_wall"] else "steady state"
        print(f"batch         {r['batch_rate']:8.2f} tracks/s  ({kind}; {r['batch_wall_rate']:.2f} tracks/s over "
              f"{r['batch_wall_s']:.1f} s including set-up)")  # fmt: skip
        print(f"efficiency    {r['batch_rate'] / limit:8.3f}  (batch / min(decode, model); target >= 0.85)")
        print(f"pipeline efficiency {r['batch_rate'] / r['model_rate']:8.3f}  (batch / model-only, same run; "
              f"{r['batch_wall_rate'] / r['model_rate']:.3f} with the job's set-up counted)")
        print(f"tracks/hour   {r['batch_rate'] * 3600:8.1f} batch, {r['model_rate'] * 3600:.1f} model-only "
              f"({args.seconds:.0f} s tracks; audio-s/s {r['batch_rate'] * args.seconds:.2f} batch)")
        if not args.skip_rss:
            _part2(root / "p2", models, args.rss_rows, args.rss_seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
