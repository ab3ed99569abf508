"""A new op is one module in ``embedd/ops/``: the socket, ``/v1/<op>``, admission, the protocol
reference and the Go client's op list take it from there, with no other edit.

The generated files are current (``python -m embedd.ops.reference --check``), and a
copy of the package with one more module serves that op on a real daemon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from embedd.ops import OPS
from embedd.ops.reference import go_source, markdown, update

from tests.daemon import REPO, Daemon, short_tmpdir
from tests.http_fixtures import free_port, wait_http

pytestmark = pytest.mark.timeout(180)

ECHO = textwrap.dedent(
    '''
    """``echo``: says a text back, shouted or not (a new op, added by a test)."""

    from typing import Annotated

    import msgspec

    from embedd.ops.op import Op, Result
    from embedd.protocol import Args


    class EchoArgs(Args):
        text: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
        shout: bool = False


    class EchoResult(Result):
        text: str
        version: str


    async def echo(service, args: EchoArgs) -> EchoResult:
        """The text, back."""
        return EchoResult(text=args.text.upper() if args.shout else args.text, version=service.version)


    OPS = (Op("echo", EchoArgs, EchoResult, echo, admitted=True),)
    '''
)


def test_the_generated_reference_and_go_op_list_are_current():
    assert update(write=False) == [], "run: python -m embedd.ops.reference --write"
    reference = markdown()
    for name, op in OPS.items():
        assert f"#### `{name}`" in reference and f'= "{name}"' in go_source()
        assert f"`{op.result.__name__}`" in reference


@pytest.fixture(scope="module")
def tree():
    """A copy of the package with one more op module, and nothing else changed."""
    root = short_tmpdir("eop-")
    shutil.copytree(REPO / "embedd", root / "embedd", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "embedd" / "ops" / "echo.py").write_text(ECHO)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_new_op_module_is_served_on_the_socket_and_over_http(tree: Path):
    port = free_port()
    (tree / "d").mkdir(exist_ok=True)
    d = Daemon(tree / "d", args=["--http", f"127.0.0.1:{port}"], env={"PYTHONPATH": str(tree)})
    d.start(cwd=tree)  # `python -m embedd` from the copy
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        answer = d.call("echo", text="hello", shout=True)
        assert answer["ok"] and answer["result"]["text"] == "HELLO", answer
        bad = d.call("echo", text="hello", colour="red")
        assert bad["error"]["code"] == "bad_request" and "'colour'" in bad["error"]["message"], bad
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/echo", data=json.dumps({"text": "hi"}).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read()) == {"text": "hi", "version": answer["result"]["version"]}
        status = d.call("status")["result"]
        assert status["admission"]["in_flight"] == 0  # the op took its permit and gave it back
    finally:
        d.stop()


def test_a_new_op_module_appears_in_the_reference_and_the_go_op_list(tree: Path):
    run = lambda code: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    reference = run("from embedd.ops.reference import markdown; print(markdown())")
    assert "#### `echo`" in reference and "| `shout` | bool | false |" in reference and "`EchoResult`:" in reference
    assert "*Admitted.*" in reference.split("#### `echo`")[1].split("####")[0]
    go = run("from embedd.ops.reference import go_source; print(go_source())")
    assert 'OpEcho ' in go and '"echo"' in go and "OpEcho: true" in go


def test_a_view_that_drifted_from_its_struct_still_answers_and_is_logged_once(caplog):
    """A subsystem's view with a key its Struct lacks: the daemon's bug. The client still gets the view
    (status keeps working), the log names the Struct and the key once, and the test daemons fail on it."""
    from embedd.ops.op import DRIFT, Result, to_wire

    class Answer(Result):
        job_id: str

    with caplog.at_level("ERROR", logger="embedd.ops.op"):
        for _ in range(2):
            assert to_wire(Answer.of({"job_id": "j", "surprise": 1})) == {"job_id": "j", "surprise": 1}
    drifted = [r.getMessage() for r in caplog.records if DRIFT in r.getMessage()]
    assert len(drifted) == 1 and "Answer" in drifted[0] and "surprise" in drifted[0]
    assert to_wire(Answer.of({"job_id": "j"})) == {"job_id": "j"}
