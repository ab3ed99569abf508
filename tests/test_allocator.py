"""The daemon's memory allocator: chosen, preloaded by one re-execution, reported, and given memory back.

The choice is pure logic (a finder is passed in); the preload is checked on the
real daemon process (its memory map) and on a real child process per
allocator this host has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedd import allocator
from embedd.allocator import REEXEC_MARK, AllocatorMissing, Plan, find_library, in_use, plan
from tests.daemon import REPO, Daemon

HOST = {name: find_library(name) for name in allocator.ALLOCATORS}


def finder(**present: str):
    return lambda name: present.get(name)


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_systems():
    assert plan("auto", finder(tcmalloc="libtcmalloc_minimal.so.4", jemalloc="libjemalloc.so.2")) == Plan(
        "tcmalloc", "libtcmalloc_minimal.so.4"
    )
    assert plan("auto", finder(jemalloc="libjemalloc.so.2")) == Plan("jemalloc", "libjemalloc.so.2")
    assert plan("auto", finder()) == Plan("system", None)
    assert plan("system", finder(tcmalloc="libtcmalloc.so.4")) == Plan("system", None)


def test_an_allocator_named_but_missing_is_refused_with_how_to_install_it():
    with pytest.raises(AllocatorMissing) as caught:
        plan("jemalloc", finder(tcmalloc="libtcmalloc_minimal.so.4"))
    assert str(caught.value) == (
        "allocator = jemalloc: no libjemalloc on this host (Debian: apt install libjemalloc2), "
        "or set allocator = auto to use it where present"
    )


def test_the_preload_goes_first_and_the_operators_settings_are_kept_and_restorable():
    env = Plan("jemalloc", "libjemalloc.so.2").environment({"LD_PRELOAD": "libmine.so", "MALLOC_CONF": "narenas:2"})
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libmine.so"
    assert env["MALLOC_CONF"] == "narenas:2"
    assert json.loads(env[REEXEC_MARK]) == {
        "LD_PRELOAD": "libmine.so", "MALLOC_CONF": "narenas:2", "TCMALLOC_RELEASE_RATE": None,
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": None,
    }  # fmt: skip
    env = Plan("jemalloc", "libjemalloc.so.2").environment({})
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and env["MALLOC_CONF"] == allocator.JEMALLOC_CONF


def test_a_ray_worker_gets_the_daemons_allocator_ahead_of_its_nodes_preload():
    env = allocator.worker_environment("auto", finder(tcmalloc="libtcmalloc_minimal.so.4"))
    assert env == {
        "LD_PRELOAD": "libtcmalloc_minimal.so.4 ${LD_PRELOAD}",  # Ray expands it on the node
        "TCMALLOC_RELEASE_RATE": "0", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62),
    }  # fmt: skip
    assert allocator.worker_environment("jemalloc", finder(jemalloc="libjemalloc.so.2"))["MALLOC_CONF"] == (
        allocator.JEMALLOC_CONF
    )
    for nothing in (("system", finder(tcmalloc="libtcmalloc_minimal.so.4")), ("auto", finder()), ("jemalloc", finder())):
        assert allocator.worker_environment(*nothing) == {}


def test_the_allocator_in_use_is_read_from_the_memory_map():
    line = "7f3a1c000000-7f3a1c021000 r-xp 00000000 08:01 1234    /usr/lib/x86_64-linux-gnu/{}"
    assert in_use(line.format("libtcmalloc_minimal.so.4.5.10")) == "tcmalloc"
    assert in_use(line.format("libjemalloc.so.2")) == "jemalloc"
    assert in_use(line.format("libc.so.6") + "\n7ffd3c5e0000-7ffd3c601000 rw-p 00000000 00:00 0    [stack]") == "system"


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc", "system"])
def test_a_process_started_with_a_plans_environment_runs_on_it_and_gives_memory_back(name):
    if name != "system" and HOST[name] is None:
        pytest.skip(f"no {name} on this host (scripts/bootstrap --test installs it)")
    env = Plan(name, HOST.get(name)).environment(os.environ)
    code = (
        "from embedd.allocator import release_free_memory, running\n"
        "block = bytearray(256 << 20); del block\n"
        "release_free_memory(); print(running())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == name


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_the_daemon_runs_on_the_allocator_it_reports_and_its_children_start_as_the_operator_started_it():
    expected = plan("auto").name
    with Daemon(env={"EMBEDD_ALLOCATOR": "auto"}) as d:
        assert d.call("status")["result"]["allocator"] == expected
        assert in_use(_maps(d.proc.pid)) == expected  # the same pid: re-executed, not a child
        assert f"memory allocator: {expected})" in d.log()  # the serving line
        # the re-executed daemon restored the environment it was given: its children (multiprocessing's
        # resource tracker from the start, decoders, Milvus Lite) get the operator's, not the preload
        children = _children(d.proc.pid)
        assert children, "the daemon has no child process to look at"
        for child in children:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith((b"LD_PRELOAD=", REEXEC_MARK.encode())) for v in environ), child
            assert in_use(_maps(child)) == "system", child
    with Daemon(args=["--allocator", "system"]) as d:
        assert d.call("status")["result"]["allocator"] == "system"
        assert in_use(_maps(d.proc.pid)) == "system"
