"""The daemon's Ray driver, in a child process: connects to the cluster, owns the model workers, places tracks.

Why a child process. A Ray driver is a Ray core worker: when the cluster's
control store (GCS) goes away for longer than Ray's reconnect timeout, Ray
ends the driver's process ("Failed to connect to GCS ... The program will
terminate", seen here with ``ray stop`` under a connected driver). The daemon
serves people and owns the job's state, so it must never be that process: it
runs this bridge (``python -m embedd.cluster.bridge``) and talks to it over
the child's stdin/stdout; a lost cluster is the bridge's exit, which the
daemon sees as end of file (:mod:`embedd.cluster.client`). The reconnect
timeout is shortened here (``RAY_gcs_rpc_server_reconnect_timeout_s``, 15 s
unless set) so that the daemon learns of a lost cluster in seconds.

What the bridge decides, and nothing more (the daemon keeps the job, its
checkpoints, retries and writes):

- **the workers**: one per GPU of the cluster (``ray_workers_per_gpu`` each)
  plus ``ray_cpu_workers`` spread over the nodes, Ray Core actors
  (:class:`~embedd.cluster.worker.ModelWorker`); a worker that dies is
  replaced (Ray schedules the new one wherever the resources are);
- **placement**: a track goes to the ready worker with the fewest tracks in
  flight, at most :data:`TRACKS_PER_WORKER` each (its executor coalesces them);
  a track the daemon marks ``alone`` (it was in flight when a worker died)
  waits for a worker with nothing else in flight and has it to itself, so a
  second death names the track that kills workers;
- **the workers' allocator**: each starts with the daemon's ``allocator``
  preloaded through Ray (:func:`embedd.allocator.worker_environment`), since
  glibc's malloc makes Music2Latent 2.4x slower on a CPU;
- **what it saw**: per worker its host, device, allocator, tracks done and
  failed, rate and last error, sent to the daemon whenever it changes.

Why actors and not Ray Data's ``map_batches``: the daemon already is the
pipeline (bounded queues, exactly-once checkpoints, pause and cancel within a
pass); Ray Data would be a second one with its own scheduling, retries and
output order. Actors replace exactly one step, "embed this track", and keep
models loaded between tracks.

Messages are length-prefixed pickles (a trusted parent and child), see
:mod:`embedd.cluster.wire`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any

from embedd import allocator
from embedd.cluster.wire import read_message, write_message

__all__ = ["TRACKS_PER_WORKER", "main"]

log = logging.getLogger("embedd.cluster")

#: Tracks in flight on one worker: one decoding while another's passes run, and coalescing on a GPU.
TRACKS_PER_WORKER = 2
#: Seconds before a worker that could not start is tried again.
RESTART_BACKOFF_S = 10.0


@dataclasses.dataclass(eq=False)
class _Worker:
    name: str
    options: dict[str, Any]
    device: str
    threads: int = 0  # its torch threads (a CPU worker: the CPUs it reserved; 0: every core it sees)
    actor: Any = None
    state: str = "starting"  # starting | ready | dead
    host: str = ""
    pid: int = 0
    allocator: str = ""  # the memory allocator its process runs on, once ready
    in_flight: int = 0
    alone: bool = False
    models: set[str] = dataclasses.field(default_factory=set)
    done: int = 0
    failed: int = 0
    first_at: float | None = None
    last_error: str | None = None
    restarts: int = 0

    def view(self, now: float) -> dict[str, Any]:
        busy = now - self.first_at if self.first_at is not None else 0.0
        return {
            "name": self.name,
            "state": self.state,
            "host": self.host,
            "device": self.device,
            "pid": self.pid,
            "allocator": self.allocator,
            "models": sorted(self.models),
            "in_flight": self.in_flight,
            "tracks_done": self.done,
            "tracks_failed": self.failed,
            "tracks_per_hour": round(self.done * 3600.0 / busy, 2) if busy > 0 else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


class Bridge:
    def __init__(self, settings: Any, out: asyncio.StreamWriter) -> None:
        self.settings = settings
        self.out = out
        self.workers: list[_Worker] = []
        self.changed = asyncio.Condition()
        self.tasks: dict[int, asyncio.Task] = {}
        self.closing = False
        self.runtime_env = {"env_vars": env} if (env := allocator.worker_environment(settings.allocator)) else None

    # ---- connecting
    def connect(self) -> None:
        import ray

        address = self.settings.ray_address
        ray.init(
            address=None if address == "local" else address,
            namespace="embedd",
            log_to_driver=False,
            include_dashboard=False,
            configure_logging=False,
        )
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        per_gpu = self.settings.ray_workers_per_gpu
        for i in range(gpus * per_gpu):
            self.workers.append(_Worker(f"gpu-{i}", {"num_gpus": 1.0 / per_gpu, "num_cpus": 1}, "cuda"))
        for i in range(self.settings.ray_cpu_workers):
            opts = {"num_cpus": self.settings.ray_worker_cpus, "num_gpus": 0, "scheduling_strategy": "SPREAD"}
            self.workers.append(_Worker(f"cpu-{i}", opts, "cpu", threads=max(1, int(self.settings.ray_worker_cpus))))
        if not self.workers:
            raise RuntimeError(
                f"the Ray cluster at {address!r} has no GPU and ray_cpu_workers is 0: there is nothing to run "
                "the models on (set ray_cpu_workers for a cluster of CPU hosts)"
            )

    def start_workers(self) -> None:
        for worker in self.workers:
            asyncio.get_running_loop().create_task(self._start(worker))

    async def _start(self, worker: _Worker) -> None:
        import ray

        from embedd.cluster.worker import ModelWorker

        remote = ray.remote(ModelWorker)
        while not self.closing:
            worker.state, worker.in_flight, worker.alone = "starting", 0, False
            await self._changed()
            try:
                worker.actor = remote.options(
                    name=f"embedd-{worker.name}-{worker.restarts}",
                    max_restarts=0,
                    max_concurrency=64,
                    runtime_env=self.runtime_env,
                    **worker.options,
                ).remote(self.settings, worker.device, worker.name, worker.threads)
                where = await worker.actor.ready.remote()
            except Exception as exc:  # the actor could not start (no resources left, a broken install)
                worker.last_error = f"could not start: {_reason(exc)}"
                log.warning("ray worker %s %s", worker.name, worker.last_error)
                worker.restarts += 1
                await asyncio.sleep(RESTART_BACKOFF_S)
                continue
            worker.host, worker.pid, worker.device = where["host"], where["pid"], where["device"]
            worker.allocator = where["allocator"]
            worker.state = "ready"
            log.info("ray worker %s is ready on %s (%s, memory allocator: %s)", worker.name, worker.host,
                     worker.device, worker.allocator)  # fmt: skip
            await self._changed()
            return

    def _died(self, worker: _Worker, actor: Any, exc: BaseException) -> None:
        if worker.actor is not actor or worker.state == "dead":
            return  # already seen through another of its tracks
        worker.state = "dead"
        worker.last_error = f"died: {_reason(exc)}"
        worker.restarts += 1
        log.warning("ray worker %s on %s %s", worker.name, worker.host or "?", worker.last_error)
        asyncio.get_running_loop().create_task(self._start(worker))

    # ---- placing tracks
    async def embed(self, message: dict[str, Any]) -> None:
        import ray

        request_id, alone = message["id"], message.get("alone", False)
        try:
            worker = await self._take(alone)
        except asyncio.CancelledError:  # withdrawn before any worker had room
            await self._send({"op": "cancelled", "id": request_id})
            raise
        actor = worker.actor
        worker.models.update(message["models"])
        try:
            ref = actor.embed.remote(message["source"], message["display"], message["models"])
            try:
                outcome, seconds = await ref
            except asyncio.CancelledError:
                ray.cancel(ref)
                raise
            except ray.exceptions.RayTaskError as exc:  # raised inside the worker, which lives on
                error = ("error", "internal", f"the Ray worker failed: {_reason(exc.cause or exc)}")
                outcome, seconds = {m: error for m in message["models"]}, 0.0
            errors = [o[2] for o in outcome.values() if o[0] == "error"]
            if errors:
                worker.failed += 1
                worker.last_error = errors[0]
            else:
                worker.done += 1
        except asyncio.CancelledError:
            await self._send({"op": "cancelled", "id": request_id})
            raise
        except Exception as exc:  # the worker died under the track (or Ray lost it): the daemon decides
            self._died(worker, actor, exc)
            await self._send({"op": "died", "id": request_id, "worker": worker.name, "error": _reason(exc)})
            return
        finally:
            if worker.actor is actor:  # not a replacement started meanwhile
                worker.in_flight -= 1
                worker.alone = False
            await self._changed()
        await self._send({"op": "result", "id": request_id, "worker": worker.name, "outcome": outcome, "seconds": seconds})

    async def _take(self, alone: bool) -> _Worker:
        async with self.changed:
            while True:
                ready = [w for w in self.workers if w.state == "ready" and not w.alone]
                if alone:
                    ready = [w for w in ready if w.in_flight == 0]
                else:
                    ready = [w for w in ready if w.in_flight < TRACKS_PER_WORKER]
                if ready:
                    worker = min(ready, key=lambda w: w.in_flight)
                    worker.in_flight += 1
                    worker.alone = alone
                    if worker.first_at is None:
                        worker.first_at = time.monotonic()
                    return worker
                await self.changed.wait()

    async def _changed(self) -> None:
        async with self.changed:
            self.changed.notify_all()
        await self._send({"op": "workers", "workers": self.view()})

    def view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [w.view(now) for w in self.workers]

    async def _send(self, message: dict[str, Any]) -> None:
        await write_message(self.out, message)

    def cancel_all(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()

    def stop(self) -> None:
        """The workers go with this process: Ray ends a driver's (non-detached) actors when it exits."""
        self.closing = True
        self.cancel_all()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


async def _serve(reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
    start = await read_message(reader)
    if start is None:
        return
    bridge = Bridge(start["settings"], out)
    try:
        bridge.connect()  # blocks this loop, which has nothing else to do yet (ray.init wants the main thread)
    except Exception as exc:
        await write_message(out, {"op": "down", "error": _reason(exc) if not isinstance(exc, RuntimeError) else str(exc)})
        return
    bridge.start_workers()
    await write_message(out, {"op": "up", "workers": bridge.view(), "capacity": len(bridge.workers) * TRACKS_PER_WORKER})
    while (message := await read_message(reader)) is not None:
        op = message["op"]
        if op == "embed":
            task = asyncio.get_running_loop().create_task(bridge.embed(message))
            bridge.tasks[message["id"]] = task
            task.add_done_callback(lambda _t, i=message["id"]: bridge.tasks.pop(i, None))
        elif op == "cancel_all":
            bridge.cancel_all()
        elif op == "stop":
            break
    bridge.stop()  # the daemon asked, or went away (end of file)


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, _protocol_out)
    out = asyncio.StreamWriter(transport, protocol, reader, loop)
    await _serve(reader, out)


def main() -> None:
    global _protocol_out
    # The protocol keeps the real stdout; anything Ray or a library prints goes to stderr (the daemon's log).
    _protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "15")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    asyncio.run(_main())


_protocol_out: Any = None

if __name__ == "__main__":
    main()
