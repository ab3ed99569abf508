"""The two lane threads: start-up, serving their lanes, yielding between passes, running a job.

The interactive thread starts the executor (device, registry, dims, preload),
then serves the control and interactive lanes and unloads idle models; the
batch thread lowers its own CPU priority and cores, then serves the batch lane
and its compile chores, starting nothing while a person's work waits or runs.
Between forward passes (:mod:`embedd.models.passes` calls back here) the batch
lane waits while interactive work is queued or running, and a call whose every
job was abandoned stops. Coalescing queued audio jobs into one call is here too
(:meth:`LaneThreads._take`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from embedd.errors import Code, EmbeddError
from embedd.executor.jobs import _Job, _Pass, _seq
from embedd.executor.lanes import Histogram, Lane, _set_compute_threads, resolve_device
from embedd.executor.registry import ModelRegistry
from embedd.models.passes import PassPolicy, running_on, stop_between_layers
from embedd.priority import lower_this_thread

log = logging.getLogger("embedd.executor")  # the name the journal showed before the split

#: Most tracks (or samples) one coalesced audio call takes: enough to fill
#: forward batches, small enough that a cancel or pause loses little.
COALESCE_MAX_TRACKS = 16
COALESCE_MAX_SAMPLES = 24_000 * 60 * 20


class LaneThreads:
    """The lane threads' side of the executor (everything here runs on a lane thread).

    Mixed into :class:`~embedd.executor.core.Executor`, whose ``__init__`` makes the
    state these methods share, under its one condition ``_cond``.
    """

    def _run_interactive(self) -> None:
        """Start-up (device, registry, dims, preload), then serve control and interactive work."""
        try:
            self.device = resolve_device(self._requested_device)
            if self.device == "cpu":
                self.threads_of["interactive"] = _set_compute_threads(0)
                log.info("interactive model work runs on %d CPU threads", self.threads_of["interactive"])
            stop_between_layers()
            registry = self._registry_builder(self.device)
            registry.on_compile_due = self._wake_batch
            with self._cond:
                registry.pin(self._pins.elements())
                self._registry = registry
            self._ready.set()
            for name in registry.names:
                registry.describe(name)
            self._described.set()
            registry.preload_all()
        except BaseException:
            log.exception("the executor could not start")
            self._fail_everything("the model executor could not start; see the daemon log")
            return
        finally:
            self._ready.set()
            self._described.set()
        policy = PassPolicy(
            lane="interactive",
            budget_s=None,
            before_pass=lambda model: self._before_pass("interactive", yield_to_interactive=False),
            started=lambda model, items: self._pass_started("interactive", model, items),
            ended=self._pass_ended,
            stopping=lambda: self._stopping_now("interactive"),
        )
        try:
            with running_on(policy):
                self._serve(registry, "interactive", (Lane.CONTROL, Lane.INTERACTIVE))
        except BaseException:  # a bug: say so, and fail what waits instead of leaving it hanging
            log.exception("the model executor stopped unexpectedly")
            self._fail_everything("the model executor stopped unexpectedly; see the daemon log")
        finally:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(timeout=5.0)  # the batch thread leaves its models first
            try:
                registry.unload_all()
            except Exception:
                log.exception("unloading the models at exit failed")

    def _run_batch(self) -> None:
        """Lower the thread's priority and cores, then serve the batch lane."""
        self._ready.wait()
        registry = self._registry
        if registry is None or self._failed:
            return
        lanes = self.lanes
        failed = lower_this_thread(lanes.batch_nice)  # its compute threads, made later, inherit it
        if failed:
            log.warning("cannot lower the batch lane's CPU priority: %s", failed)
        if self.device == "cpu":
            self.threads_of["batch"] = _set_compute_threads(lanes.batch_threads)
            log.info(
                "batch model work runs on %d CPU threads at nice %d, passes of about %s s",
                self.threads_of["batch"], lanes.batch_nice, lanes.pass_budget_s or "unbounded",
            )  # fmt: skip
        policy = PassPolicy(
            lane="batch",
            budget_s=lanes.pass_budget_s or None,
            before_pass=lambda model: self._before_pass("batch", yield_to_interactive=True),
            started=lambda model, items: self._pass_started("batch", model, items),
            ended=self._pass_ended,
            stopping=lambda: self._stopping_now("batch"),
        )
        try:
            with running_on(policy):
                self._serve(registry, "batch", (Lane.BATCH,))
        except BaseException:
            log.exception("the model executor's batch lane stopped unexpectedly")
            self._fail_everything("the model executor stopped unexpectedly; see the daemon log")

    def _interactive_busy(self) -> bool:
        """Interactive or control work queued or running (caller holds ``_cond``)."""
        if self._interactive_running:
            return True
        return any(not job.abandoned for lane in (Lane.CONTROL, Lane.INTERACTIVE) for job in self._queues[lane])

    def _wake_batch(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _serve(self, registry: ModelRegistry, label: str, lanes: tuple[Lane, ...]) -> None:
        interactive = label == "interactive"
        next_idle_check = time.monotonic() + self._idle_check_s
        while True:
            compile_due: str | None = None
            with self._cond:
                while not self._stopping:
                    # The batch lane's chores: its queue, and compiling a freshly loaded model (before
                    # the next batch job, which then runs compiled; see embedd.models.compiled).
                    compile_due = None if interactive else registry.compile_due()
                    if compile_due or any(self._queues[lane] for lane in lanes):
                        if interactive or not self._interactive_busy():
                            break  # the batch lane starts nothing while a person's work waits or runs
                    timeout = next_idle_check - time.monotonic() if interactive else None
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                batch = [] if compile_due else self._take(lanes)
                if batch:
                    self._running[label] = batch
                    if interactive:
                        self._interactive_running += 1
            if compile_due:
                registry.compile(compile_due, label)
            if batch:
                try:
                    self._execute(registry, label, batch)
                finally:
                    with self._cond:
                        self._running.pop(label, None)
                        if interactive:
                            self._interactive_running -= 1
                        self._cond.notify_all()
            if interactive and time.monotonic() >= next_idle_check:
                try:
                    registry.unload_idle(queued=self._queued_models())
                except Exception:  # e.g. a CUDA error while freeing: keep serving
                    log.exception("unloading idle models failed")
                next_idle_check = time.monotonic() + self._idle_check_s

    def _queued_models(self) -> set[str]:
        with self._cond:
            return {job.model for queue in self._queues.values() for job in queue if job.model}

    def _take(self, lanes: tuple[Lane, ...]) -> list[_Job]:
        """The next job by lane priority, plus queued audio jobs it can share a forward pass with.

        Caller holds ``_cond``.
        """
        for lane in lanes:
            queue = self._queues[lane]
            while queue:
                first = queue.popleft()
                if first.abandoned or first.future.done():  # cancelled while queued
                    continue
                batch = [first]
                if first.waveform is not None:
                    samples = first.waveform.shape[-1]
                    for job in list(queue):
                        if len(batch) >= COALESCE_MAX_TRACKS or samples >= COALESCE_MAX_SAMPLES:
                            break
                        if job.waveform is not None and job.model == first.model and not job.abandoned:
                            queue.remove(job)
                            batch.append(job)
                            samples += job.waveform.shape[-1]
                stats = self.stats["batch" if lane is Lane.BATCH else "interactive"]
                now = time.monotonic()
                seq = next(_seq)
                for job in batch:
                    job.started_seq = seq
                    stats.queue_wait.observe(now - job.queued_at)
                return batch
        return []

    # -- between passes (lane threads) ---------------------------------------------
    def _before_pass(self, label: str, *, yield_to_interactive: bool) -> None:
        """Stop a call nobody waits for; on the batch lane, wait while a person's work is queued or running."""
        with self._cond:
            if yield_to_interactive and self._interactive_busy():
                self._yielding.add(label)
                try:
                    while not self._stopping and self._interactive_busy():
                        self._cond.wait()
                finally:
                    self._yielding.discard(label)
            jobs = self._running.get(label)
        if jobs and all(job.abandoned for job in jobs):
            raise EmbeddError(Code.CANCELLED, "nobody waits for this work any more (cancelled)")

    def _stopping_now(self, label: str) -> bool:
        """Whether the lane's call should stop mid-pass: shutdown, or nobody waits for any of its jobs.

        Asked before every module of a forward pass: no lock (reads of a dict entry, a
        list and bools are atomic in CPython; a stale answer only delays the stop by a layer).
        """
        if self._stopping:
            return True
        jobs = self._running.get(label)
        return bool(jobs) and all(job.abandoned for job in jobs)

    def _pass_started(self, label: str, model: str, items: int) -> _Pass:
        entry = _Pass(label, model, items, time.monotonic(), next(_seq))
        with self._cond:
            self._in_flight[label] = entry
            self._recent_passes.append(entry)  # shown in flight, then with its end
        return entry

    def _pass_ended(self, token: object, seconds: float) -> None:
        entry = token if isinstance(token, _Pass) else None
        if entry is None:
            return
        with self._cond:
            entry.ended_seq, entry.seconds = next(_seq), seconds
        stats = self.stats[entry.lane]
        histogram = stats.pass_duration.get(entry.model)
        if histogram is None:
            histogram = stats.pass_duration[entry.model] = Histogram()
        histogram.observe(seconds)
        with self._cond:
            if self._in_flight.get(entry.lane) is entry:
                del self._in_flight[entry.lane]

    # -- running a job (lane threads) -----------------------------------------------
    def _execute(self, registry: ModelRegistry, label: str, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]]
        first = batch[0]
        try:
            if first.model is None:
                results = [first.fn(registry)]  # type: ignore[misc]
            else:
                with registry.using(first.model, label) as model:
                    if first.waveform is None:
                        results = [first.fn(registry)]  # type: ignore[misc]
                    else:
                        results = model.embed_audio_many([job.waveform for job in batch])  # type: ignore[misc]
                        if len(results) != len(batch):
                            raise RuntimeError(f"{model.name} returned {len(results)} embeddings for {len(batch)} tracks")
            outcomes = [(result, None) for result in results]
        except EmbeddError as exc:
            outcomes = [(None, exc)] * len(batch)
        except Exception as exc:  # a bug in a backend: say so, keep serving
            log.exception("executor job failed")
            err = EmbeddError(Code.INTERNAL, f"executor job failed: {type(exc).__name__}: {exc}")
            outcomes = [(None, err)] * len(batch)
        done_seq = next(_seq)
        with self._cond:
            if all(job.abandoned for job in batch) and any(exc is not None for _, exc in outcomes):
                self.stats[label].dropped += len(batch)  # stopped early: nobody waited for it
            for job in batch:
                self._recent_jobs.append({
                    "lane": job.lane.label, "kind": job.kind, "model": job.model,
                    "queued_seq": job.queued_seq, "started_seq": job.started_seq, "done_seq": done_seq,
                })  # fmt: skip
        for job, (result, exc) in zip(batch, outcomes, strict=True):
            self._resolve(job, result=result, exc=exc)

    def _resolve(self, job: _Job, *, result: Any = None, exc: BaseException | None = None) -> None:
        loop = job.future.get_loop()

        def _set() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        try:
            loop.call_soon_threadsafe(_set)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _fail_everything(self, message: str) -> None:
        with self._cond:
            self._failed = message
            jobs = self._take_queued()
        self._ready.set()
        for job in jobs:
            self._resolve(job, exc=EmbeddError(Code.UNAVAILABLE, message))
