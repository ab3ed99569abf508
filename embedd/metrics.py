"""Prometheus metrics: request counts and latency, queues, models, the batch job, audio embedded.

Requests are counted where every client's request goes through: the op table.
:meth:`Metrics.instrument` wraps each handler of ``build_handlers`` once, and
the socket connection and the HTTP routes both dispatch through that wrapped
table, so a ``ping`` is counted the same whichever way it came. Requests
rejected before any handler runs (bad arguments, an unknown op) are counted by
:meth:`Metrics.rejected`, from the same two places that parse requests.

Everything else is read from the service when Prometheus scrapes (a custom
collector), so the daemon's hot paths carry no bookkeeping for it.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import time
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from embedd.service import Service

from embedd.errors import EmbeddError
from embedd.models import MODEL_NAMES
from embedd.ops import SCHEMAS
from embedd.protocol import Handler

__all__ = ["Metrics", "outcome_code"]

#: Request latency buckets, seconds: from an inline ping to a long track on CPU.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def outcome_code(exc: BaseException) -> str:
    """The ``code`` label of a request that raised ``exc``: its wire code, ``cancelled`` or ``internal``."""
    if isinstance(exc, EmbeddError):
        return exc.code.value
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "internal"


class Metrics:
    """The daemon's metrics, in its own registry (tests run several daemons in one process).

    Request counts and latencies are plain dicts and lists updated on the event
    loop (the only thread that answers requests), and become Prometheus
    families only when scraped: prometheus_client's own Counter and Histogram
    take a lock per update, which cost more than an inline ``ping`` itself.
    """

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counts: dict[tuple[str, str], int] = {}
        self._durations: dict[str, list] = {}  # op -> [per-bucket counts (last: +Inf), sum]
        self.registry.register(_RequestCollector(self))
        self.registry.register(_ServiceCollector(service))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    # -- counting ------------------------------------------------------------------
    def observe(self, op: str, code: str, seconds: float) -> None:
        """One answered request."""
        key = (op, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        stats = self._durations.get(op)
        if stats is None:
            stats = self._durations[op] = [[0] * (len(DURATION_BUCKETS) + 1), 0.0]
        stats[0][bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        stats[1] += seconds

    def rejected(self, op: object, code: str) -> None:
        """A request refused before its handler ran; unknown op names all count as 'unknown'."""
        key = (op if isinstance(op, str) and op in SCHEMAS else "unknown", code)
        self._counts[key] = self._counts.get(key, 0) + 1

    def instrument(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        """The same op table, each handler counted and timed."""
        return {op: dataclasses.replace(h, fn=self._wrap(op, h)) for op, h in handlers.items()}

    def _wrap(self, op: str, handler: Handler) -> Any:
        fn, observe, clock = handler.fn, self.observe, time.perf_counter

        if handler.inline:

            def inline(args: Any) -> Any:
                start = clock()
                try:
                    result = fn(args)
                except Exception as exc:
                    observe(op, outcome_code(exc), clock() - start)
                    raise
                observe(op, "ok", clock() - start)
                return result

            return inline

        if handler.streaming:

            async def streaming(args: Any) -> Any:
                start, code = clock(), "ok"
                try:
                    async for item in fn(args):
                        yield item
                except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
                    code = outcome_code(exc)
                    raise
                finally:
                    observe(op, code, clock() - start)

            return streaming

        async def call(args: Any) -> Any:
            start = clock()
            try:
                result = await fn(args)
            except (Exception, asyncio.CancelledError) as exc:
                observe(op, outcome_code(exc), clock() - start)
                raise
            observe(op, "ok", clock() - start)
            return result

        return call

    # -- exposition --------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition format, for GET /metrics."""
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """embedd_requests_total and embedd_request_duration_seconds, from the plain counters."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        counts = CounterMetricFamily(
            "embedd_requests", "Requests answered, by op and result code ('ok' or the error code).", labels=["op", "code"]
        )
        for (op, code), n in sorted(self._metrics._counts.items()):
            counts.add_metric([op, code], n)
        yield counts
        durations = HistogramMetricFamily(
            "embedd_request_duration_seconds", "Time from a parsed request to its answer, by op.", labels=["op"]
        )
        bounds = [*map(floatToGoString, DURATION_BUCKETS), "+Inf"]
        for op, (per_bucket, total) in sorted(self._metrics._durations.items()):
            cumulative = list(itertools.accumulate(per_bucket))
            durations.add_metric([op], list(zip(bounds, cumulative)), total)
        yield durations


class _ServiceCollector(Collector):
    """Gauges read from the service at scrape time."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def describe(self) -> Iterator[Any]:
        return iter(())  # dynamic: prometheus_client then calls collect() only when scraped

    def collect(self) -> Iterator[Any]:
        executor = self._service.executor
        queue = GaugeMetricFamily("embedd_queue_depth", "Requests waiting for the model executor, by lane.", labels=["lane"])
        for lane, depth in executor.queue_depths.items():
            queue.add_metric([lane], depth)
        yield queue

        loaded = GaugeMetricFamily("embedd_model_loaded", "1 while the model is loaded.", labels=["model"])
        states = GaugeMetricFamily(
            "embedd_model_state", "1 for the model's state now: unloaded, loading, idle or running.", labels=["model", "state"]
        )
        running = GaugeMetricFamily(
            "embedd_model_running", "1 while the lane runs work in the model.", labels=["model", "lane"]
        )
        snapshot = executor.snapshot()
        for name in MODEL_NAMES:
            state = snapshot.get(name)
            loaded.add_metric([name], 1.0 if state is not None and state.loaded else 0.0)
            now = state.state if state is not None else "unloaded"
            for option in ("unloaded", "loading", "idle", "running"):
                states.add_metric([name, option], 1.0 if option == now else 0.0)
            for lane in ("interactive", "batch"):
                running.add_metric([name, lane], 1.0 if state is not None and lane in state.running else 0.0)
        yield loaded
        yield states
        yield running
        yield from _lane_families(executor)
        yield from _io_lane_families(self._service)

        yield from _watch_families(self._service.watch_view())
        progress = self._service.batch.progress.view()
        for key, text in (
            ("total_tracks", "Tracks in the latest batch job's library (shard)."),
            ("processed_tracks", "Tracks the latest batch job embedded."),
            ("failed_tracks", "Tracks the latest batch job failed in at least one model."),
        ):
            yield GaugeMetricFamily(f"embedd_batch_{key}", text, value=progress.get(key) or 0)
        yield from _cluster_families(progress.get("cluster"))

        audio = CounterMetricFamily("embedd_audio_seconds", "Seconds of audio embedded, by model.", labels=["model"])
        seconds = executor.audio_seconds
        for name in MODEL_NAMES:
            audio.add_metric([name], float(seconds.get(name, 0.0)))
        yield audio


def _cluster_families(view: dict[str, Any] | None) -> Iterator[Any]:
    """The Ray cluster the library job runs on (``ray_address``): its state, and each model worker's work."""
    if view is None:
        return
    up = GaugeMetricFamily("embedd_cluster_state", "1 for the Ray cluster's state now.", labels=["state"])
    for option in ("closed", "connecting", "up", "down", "fallback"):
        up.add_metric([option], 1.0 if view["state"] == option else 0.0)
    yield up
    labels = ["worker", "host", "device"]
    done = CounterMetricFamily("embedd_cluster_worker_tracks", "Tracks a Ray model worker embedded, by outcome.", labels=[*labels, "outcome"])
    rate = GaugeMetricFamily("embedd_cluster_worker_tracks_per_hour", "A Ray model worker's rate since its first track.", labels=labels)
    ready = GaugeMetricFamily("embedd_cluster_worker_ready", "1 while a Ray model worker takes tracks.", labels=labels)
    restarts = CounterMetricFamily("embedd_cluster_worker_restarts", "Times a Ray model worker was started again.", labels=labels)
    for worker in view["workers"]:
        key = [worker["name"], worker["host"], worker["device"]]
        done.add_metric([*key, "embedded"], worker["tracks_done"])
        done.add_metric([*key, "failed"], worker["tracks_failed"])
        rate.add_metric(key, worker["tracks_per_hour"] or 0.0)
        ready.add_metric(key, 1.0 if worker["state"] == "ready" else 0.0)
        restarts.add_metric(key, worker["restarts"])
    yield from (done, rate, ready, restarts)


def _watch_families(view: dict[str, Any] | None) -> Iterator[Any]:
    """The library watcher (automatic jobs): when it last saw the library, what is pending, why it waits."""
    if view is None:
        return
    yield GaugeMetricFamily("embedd_library_watch_enabled", "1 while the library watcher may start automatic jobs.",
                            value=1.0 if view["enabled"] else 0.0)  # fmt: skip
    yield GaugeMetricFamily(
        "embedd_library_watch_last_seen_timestamp_seconds", "When the watcher last read Navidrome's database (0: never).",
        value=view["last_seen_at"] or 0.0,
    )
    pending = GaugeMetricFamily("embedd_library_watch_pending_tracks", "Changed tracks waiting for an automatic job.", labels=["kind"])
    for kind, n in view["pending"].items():
        pending.add_metric([kind], n)
    yield pending
    yield GaugeMetricFamily(
        "embedd_library_watch_next_job_timestamp_seconds", "When the next automatic job may start (0: none due).",
        value=view["next_job_at"] or 0.0,
    )
    waiting = GaugeMetricFamily("embedd_library_watch_waiting", "1 for why pending tracks wait now.", labels=["reason"])
    if view["waiting"]:
        waiting.add_metric([view["waiting"].split(":")[0]], 1.0)
    yield waiting
    yield GaugeMetricFamily("embedd_library_watch_scan_in_progress", "1 while Navidrome scans.", value=float(view["scan_in_progress"]))
    yield GaugeMetricFamily("embedd_library_watch_held_missing_tracks", "Missing tracks whose vectors are kept.", value=view["held_missing"])
    yield CounterMetricFamily("embedd_library_watch_auto_jobs", "Automatic jobs started.", value=view["auto_jobs"])
    yield GaugeMetricFamily(
        "embedd_library_watch_poll_rows_read", "Rows the last poll read from Navidrome's database (a diff's included).",
        value=view["last_poll"]["rows_read"] + view["last_poll"]["diff_rows_read"],
    )
    yield GaugeMetricFamily("embedd_library_watch_poll_seconds", "How long the last poll took.", value=view["last_poll"]["duration_s"])


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Any) -> None:
    bounds = [*map(floatToGoString, histogram.buckets), "+Inf"]
    cumulative = list(itertools.accumulate(histogram.counts))
    family.add_metric(labels, list(zip(bounds, cumulative)), histogram.sum)


def _lane_families(executor: Any) -> Iterator[Any]:
    """The executor's lanes in the style of TEI's metrics: queue wait and pass time, drops and refusals."""
    view = executor.lanes_view()["lanes"]
    oldest = GaugeMetricFamily(
        "embedd_queue_oldest_wait_seconds", "How long the oldest waiting job has waited, by lane (0 when none).",
        labels=["lane"],
    )  # fmt: skip
    in_flight = GaugeMetricFamily(
        "embedd_pass_in_flight_seconds", "Age of the forward pass running now, by lane (0 when none).", labels=["lane"]
    )
    for lane, entry in view.items():
        oldest.add_metric([lane], entry["oldest_wait_s"] or 0.0)
        in_flight.add_metric([lane], (entry["pass"] or {}).get("age_s") or 0.0)
    yield oldest
    yield in_flight
    wait = HistogramMetricFamily(
        "embedd_queue_wait_seconds", "Time a job waited for its lane's thread, by lane.", labels=["lane"]
    )
    passes = HistogramMetricFamily(
        "embedd_pass_duration_seconds", "Duration of one forward pass, by lane and model.", labels=["lane", "model"]
    )
    dropped = CounterMetricFamily(
        "embedd_jobs_dropped", "Jobs withdrawn or stopped because nobody waited for them any more, by lane.",
        labels=["lane"],
    )  # fmt: skip
    overloaded = CounterMetricFamily(
        "embedd_jobs_overloaded", "Jobs refused because the lane's queue was full, by lane.", labels=["lane"]
    )
    for lane, stats in executor.stats.items():
        _histogram(wait, [lane], stats.queue_wait)
        for model, histogram in sorted(stats.pass_duration.items()):
            _histogram(passes, [lane, model], histogram)
        dropped.add_metric([lane], stats.dropped)
        overloaded.add_metric([lane], stats.overloaded)
    yield wait
    yield passes
    yield dropped
    yield overloaded


def _io_lane_families(service: Any) -> Iterator[Any]:
    """The decoder's and the store's lanes (depth and oldest wait), and admission's bounds and refusals."""
    depth = GaugeMetricFamily(
        "embedd_io_queue_depth", "Work waiting for the decoder's workers or the store's threads, by component and lane.",
        labels=["component", "lane"],
    )  # fmt: skip
    oldest = GaugeMetricFamily(
        "embedd_io_queue_oldest_wait_seconds", "How long the oldest waiting decode or store call has waited (0 when none).",
        labels=["component", "lane"],
    )  # fmt: skip
    views = {"store": service.store_io.lanes_view()}
    if service.decoder is not None:
        views["decoder"] = service.decoder.lanes_view()
    for component, lanes in views.items():
        for lane, entry in lanes.items():
            depth.add_metric([component, lane], entry.get("depth") or 0)
            oldest.add_metric([component, lane], entry.get("oldest_wait_s") or 0.0)
    yield depth
    yield oldest
    admission = service.admission.view()
    yield GaugeMetricFamily("embedd_admitted_requests", "Requests admitted and not yet answered.", value=admission["in_flight"])
    yield GaugeMetricFamily("embedd_admitted_bytes", "Bytes of payload the admitted requests hold.", value=admission["bytes_held"])
    refused = CounterMetricFamily(
        "embedd_admission_overloaded", "Requests refused 'overloaded' by admission, by the bound they hit.", labels=["bound"]
    )
    for bound, n in sorted(admission["overloaded"].items()):
        refused.add_metric([bound], n)
    yield refused
