"""The library job on a real two-node Ray cluster started on this machine (``ray start`` twice).

The daemon joins it (``ray_address``), its bridge starts one CPU model worker
per node, and the job's tracks go to whichever worker is free; the daemon
keeps the job, checkpoints and writes. Checked at the natural level: a real
daemon, real Ray nodes and workers, the tiny MuQ and MERT and the stock-size
Music2Latent, rows read back from the Milvus Lite file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedd import allocator
from tests.batch_fixtures import BatchDaemon, Library, _with_store, stored_ids
from tests.daemon import short_tmpdir

if not Path(sys.executable).with_name("ray").exists():  # the test extra installs it: fail, never skip
    raise RuntimeError("tests/test_ray.py needs Ray: scripts/bootstrap --test installs it (embedd[test])")

MODELS = ["muq", "mert", "latent"]
#: The same arithmetic on both paths: one window per forward pass and one torch thread (a CPU worker's
#: share, ``ray_worker_cpus``). Which tracks share a pass, and how many threads split a product, change
#: a real-size model's float sums: with the in-process defaults (batches, both cores) the stock-size
#: Music2Latent vectors of the two paths met at cosine 0.99998; like for like, at >= 0.99999.
SAME_PASSES = ["--batch-size", "1", "--batch-threads", "1"]
RAY = str(Path(sys.executable).with_name("ray"))


class TwoNodes:
    """A head node and a second node, one CPU each, on this machine."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.temp = short_tmpdir("ray-")
        #: Ray's token authentication, explicit: every node, and the daemon's bridge, hold the same token
        #: (left unset, a token another Ray on this host wrote to ~/.ray would decide it).
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}

    def _ray(self, *args: str) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth_env}
        done = subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ray {' '.join(args)}: {done.stdout}\n{done.stderr}"

    def start(self) -> None:
        common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
        self._ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                  "--include-dashboard=false", "--temp-dir", str(self.temp), *common)  # fmt: skip
        self._ray("start", "--address", self.address, "--node-ip-address", "127.0.0.1", *common)

    def stop(self) -> None:
        self._ray("stop", "--force")


@pytest.fixture(scope="module")
def nodes():
    cluster = TwoNodes()
    cluster.start()
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def models(real_models) -> dict[str, str]:
    """The tiny MuQ and MERT, the stock-size Music2Latent."""
    return {"muq": real_models["muq"], "mert": real_models["tiny_mert"], "latent": real_models["latent"]}


@pytest.fixture
def root():
    d = short_tmpdir("er-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _daemon(root: Path, lib: Library, models: dict[str, str], nodes: TwoNodes, *extra: str) -> BatchDaemon:
    d = BatchDaemon(
        root / "d", lib, models,
        extra=["--ray-address", nodes.address, "--ray-cpu-workers", "2", "--checkpoint-every", "4", *extra],
    )  # fmt: skip
    d.env.update(nodes.auth_env)
    return d


def _workers(d: BatchDaemon) -> dict[str, dict]:
    cluster = d.progress()["cluster"]
    return {w["name"]: w for w in cluster["workers"]} if cluster else {}


def _exact_rows(d: BatchDaemon, dims: dict[str, int], ids: set[str]) -> None:
    """Every track once per model (none lost, none twice); read with the daemon stopped (Milvus Lite)."""
    stored = stored_ids(str(d.data_dir / "milvus.db"), dims)
    for model in MODELS:
        assert sorted(stored[model]) == sorted(ids), model


def _job(d: BatchDaemon, n: int) -> tuple[dict, dict[str, int]]:
    """Run a full job to its end: the final progress and the models' dims."""
    d.start()
    d.ok("batch_start")
    final = d.wait_final(timeout=900)
    assert final["status"] == "completed" and final["processed_tracks"] == n, (final, d.log()[-4000:])
    return final, {m: v["dim"] for m, v in d.ok("status")["models"].items()}


def test_a_three_model_job_runs_on_both_nodes_with_the_in_process_vectors(root: Path, models, nodes: TwoNodes):
    lib = Library(root / "lib")
    tracks = lib.add_good(12, duration_s=3.0)
    ids = {t.track_id for t in tracks}
    here = BatchDaemon(root / "here", lib, models, extra=["--checkpoint-every", "4", *SAME_PASSES])  # in-process
    try:
        _, dims = _job(here, len(tracks))
    finally:
        here.stop()
    there = _daemon(root, lib, models, nodes, *SAME_PASSES)
    try:
        final, _ = _job(there, len(tracks))
        workers = {w["name"]: w for w in final["cluster"]["workers"]}
        assert sorted(workers) == ["cpu-0", "cpu-1"], final["cluster"]
        assert all(w["tracks_done"] > 0 for w in workers.values()), workers  # both nodes took tracks
        assert sum(w["tracks_done"] for w in workers.values()) == len(tracks)
        # preloaded through Ray's runtime_env: the nodes were started without it (glibc's malloc otherwise)
        assert {w["allocator"] for w in workers.values()} == {allocator.plan("auto").name}, workers
        assert final["cluster"]["state"] == "closed"  # the workers go with the job
    finally:
        there.stop()
    _exact_rows(there, dims, ids)

    def vectors(d: BatchDaemon) -> dict[str, dict[str, np.ndarray]]:
        return _with_store(str(d.data_dir / "milvus.db"), dims, lambda s: {m: s.get_vectors(m, sorted(ids)) for m in MODELS})

    mine, theirs = vectors(here), vectors(there)
    for model in MODELS:
        for track_id in ids:
            a, b = mine[model][track_id].astype(np.float64), theirs[model][track_id].astype(np.float64)
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            assert cos >= 0.99999, (model, track_id, cos)


def _wait_workers(d: BatchDaemon, ready: int, timeout: float = 300.0) -> dict[str, dict]:
    """The workers once ``ready`` of them took tracks (each has finished one)."""
    p = d.wait_for(
        lambda p: p["cluster"] is not None and sum(w["tracks_done"] > 0 for w in p["cluster"]["workers"]) >= ready,
        timeout=timeout,
    )
    return {w["name"]: w for w in p["cluster"]["workers"]}


def test_a_worker_killed_mid_job_loses_nothing(root: Path, models, nodes: TwoNodes):
    lib = Library(root / "lib")
    tracks = lib.add_good(12, duration_s=3.0)
    d = _daemon(root, lib, models, nodes)
    d.start()
    try:
        d.ok("batch_start")
        workers = _wait_workers(d, ready=2)
        victim = workers["cpu-1"]
        os.kill(victim["pid"], signal.SIGKILL)  # the worker process, its models and its tracks in flight
        final = d.wait_final(timeout=900)
        assert final["status"] == "completed" and final["processed_tracks"] == len(tracks), final
        after = {w["name"]: w for w in final["cluster"]["workers"]}
        assert after["cpu-1"]["restarts"] >= 1 and "died" in after["cpu-1"]["last_error"], after
        dims = {m: v["dim"] for m, v in d.ok("status")["models"].items()}
    finally:
        d.stop()
    _exact_rows(d, dims, {t.track_id for t in tracks})


def test_a_lost_cluster_makes_the_job_wait_and_it_goes_on_when_the_cluster_is_back(root: Path, models, nodes: TwoNodes):
    """``ray_fallback = wait`` (the default): the whole cluster stops mid-job; the job waits, says why,
    and completes once the cluster is started again. (Last in this module: it restarts the cluster.)"""
    lib = Library(root / "lib")
    tracks = lib.add_good(12, duration_s=3.0)
    d = _daemon(root, lib, models, nodes)
    d.start()
    try:
        d.ok("batch_start")
        _wait_workers(d, ready=1)
        nodes.stop()
        waiting = d.wait_for(lambda p: p["waiting"] is not None and "Ray cluster" in p["waiting"], timeout=300)
        assert waiting["status"] == "running" and waiting["cluster"]["state"] in ("down", "connecting"), waiting
        nodes.start()
        final = d.wait_final(timeout=900)
        assert final["status"] == "completed" and final["processed_tracks"] == len(tracks), final
        dims = {m: v["dim"] for m, v in d.ok("status")["models"].items()}
    finally:
        d.stop()
    _exact_rows(d, dims, {t.track_id for t in tracks})


def test_with_fallback_local_a_lost_cluster_hands_the_job_to_the_daemon(root: Path, models, nodes: TwoNodes):
    lib = Library(root / "lib")
    tracks = lib.add_good(12, duration_s=3.0)
    d = _daemon(root, lib, models, nodes, "--ray-fallback", "local")
    d.start()
    try:
        d.ok("batch_start")
        _wait_workers(d, ready=1)
        nodes.stop()
        final = d.wait_final(timeout=900)
        assert final["status"] == "completed" and final["processed_tracks"] == len(tracks), final
        assert "is unreachable" in d.log(), d.log()[-3000:]  # the job went on in the daemon
        dims = {m: v["dim"] for m, v in d.ok("status")["models"].items()}
    finally:
        d.stop()
        nodes.start()
    _exact_rows(d, dims, {t.track_id for t in tracks})
