"""The model catalogue is the one place that names models.

A fourth backend (tests/stats_model.py) plus one catalogue entry, registered the
way a package would (an ``embedd.models`` entry point), is served through
embed_file, a batch job and search with no other change to embedd; the
protocol, the settings, the hints and the Go client's constants all follow
the catalogue.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedd.models import CATALOG, DEFAULT_JOB_MODELS, ENTRY_POINT_GROUP, TEXT_MODELS, _catalogue
from embedd.ops import parse_request
from embedd.settings import Settings, source_field
from tests.batch_fixtures import BatchDaemon, Library, write_audio
from tests.daemon import REPO, short_tmpdir

GO_TYPES = REPO / "clients" / "go" / "embedd" / "types.go"
BUILT_IN = ("muq", "mert", "latent")


def _plugin_dir(root: Path, entries: dict[str, str]) -> Path:
    """A directory that, on sys.path, holds an installed distribution with these entry points."""
    name = "embedd_test_" + "_".join(entries)  # distributions of one name shadow each other
    dist = root / "plugin" / f"{name}-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{name} = {target}" for name, target in entries.items())]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return dist.parent


@pytest.fixture
def root():
    d = short_tmpdir("ec-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# what derives from the catalogue, in this process (the three built-in models)
# ---------------------------------------------------------------------------


def test_built_in_catalogue_and_what_derives_from_it():
    assert tuple(CATALOG) == BUILT_IN
    assert DEFAULT_JOB_MODELS == BUILT_IN and TEXT_MODELS == ("muq",)
    for name, info in CATALOG.items():
        field = Settings.model_fields[source_field(name)]
        assert field.default == info.default_source and field.description == info.source_help
    assert parse_request({"op": "batch_start"}).args.models == list(BUILT_IN)
    with pytest.raises(Exception, match=r"'clap' is not one of muq, mert, latent"):
        parse_request({"op": "search", "model": "clap", "text": "jazz"})


def test_go_client_constants_are_the_catalogue():
    """clients/go/embedd/types.go names exactly the built-in models, with their wire names."""
    text = GO_TYPES.read_text()
    block = re.search(r"// Model names of protocol v1\b.*?\nconst \(\n(.*?)\n\)", text, re.S)
    assert block, "the Go client's model-name const block moved"
    names = re.findall(r'^\s*Model\w+\s*=\s*"([^"]+)"', block.group(1), re.M)
    assert names == list(CATALOG)


def test_entry_points_join_the_catalogue_and_clashes_fail_loudly(root, monkeypatch):
    monkeypatch.syspath_prepend(str(_plugin_dir(root, {"stats": "tests.stats_model:INFO"})))
    catalog = _catalogue()
    assert tuple(catalog) == (*BUILT_IN, "stats")
    assert catalog["stats"].backend == "tests.stats_model:LogMelStatsModel"
    assert catalog["muq"] is CATALOG["muq"]

    clash = root / "clash"
    clash.mkdir()
    (clash / "clash_entries.py").write_text(
        "from embedd.models import ModelInfo\n"
        "TWIN = ModelInfo('twin', 'embedding', 16000, 1, False, 8, 'src', 'm:C')\n"
        "MISNAMED = ModelInfo('other', 'other_embedding', 16000, 1, False, 8, 'src', 'm:C')\n"
    )
    monkeypatch.syspath_prepend(str(clash))
    for target, message in [("clash_entries:TWIN", "clashes with model 'muq'"), ("clash_entries:MISNAMED", "must name")]:
        with monkeypatch.context() as patch:
            patch.syspath_prepend(str(_plugin_dir(root / target.replace(":", "_"), {"twin": target})))
            with pytest.raises(RuntimeError, match=message):
                _catalogue()


# ---------------------------------------------------------------------------
# a fourth backend, served by a real daemon
# ---------------------------------------------------------------------------


def _vector(result: dict) -> np.ndarray:
    return np.frombuffer(result["vector"], dtype="<f4")


def test_a_fourth_backend_is_served_through_embed_file_batch_and_search(root, tiny_models):
    plugin = _plugin_dir(root, {"stats": "tests.stats_model:INFO"})
    lib = Library(root / "lib")
    tracks = lib.add_good(3)
    d = BatchDaemon(root / "d", lib, tiny_models, extra=["--stats-model", "log-mel-32"])
    d.env["PYTHONPATH"] = str(plugin)
    d.start()
    try:
        # status describes it from its catalogue entry; its source came from --stats-model
        status = d.ok("status")["models"]["stats"]
        assert status["collection"] == "stats_embedding" and status["text"] is False and status["dim"] == 64

        # embed_file, stored; the same file twice gives the same vector, another file another one
        upload = write_audio(lib.music / "uploads" / "upload", index=7)  # not a library track
        one = d.ok("embed_file", path=str(upload), models=["stats"], store=True, track_id="upload-1")
        again = d.ok("embed_file", path=str(upload), models=["stats"])
        other = d.ok("embed_file", path=str(lib.path_of(tracks[0])), models=["stats"])
        vector = _vector(one["models"]["stats"])
        assert one["models"]["stats"]["dim"] == 64 and vector.shape == (64,)
        assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5) and one["models"]["stats"]["windows"] > 1
        np.testing.assert_array_equal(vector, _vector(again["models"]["stats"]))
        assert float(vector @ _vector(other["models"]["stats"])) < 0.9999
        found = d.ok("search", model="stats", vector=one["models"]["stats"]["vector"], limit=5)["hits"]
        assert [h["track_id"] for h in found] == ["upload-1"] and found[0]["score"] == pytest.approx(1.0, abs=1e-4)

        # the hint for text names the text-capable models of the catalogue
        refused = d.call("search", model="stats", text="jazz")
        assert refused["error"]["code"] == "unsupported" and "use 'muq'" in refused["error"]["message"]

        # a batch job naming it embeds the library into its collection
        started = d.ok("batch_start", models=["stats"])
        final = d.wait_final()
        assert final["job_id"] == started["job_id"] and final["status"] == "completed", final
        assert final["models"] == ["stats"] and final["processed_tracks"] == len(tracks)

        # search by a stored track finds it first, among the library's tracks (the job keeps the
        # collection to the library: the upload, no library track, is gone)
        hits = d.ok("search", model="stats", track_id=tracks[0].track_id, limit=10)["hits"]
        assert hits[0]["track_id"] == tracks[0].track_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert {h["track_id"] for h in hits} == {t.track_id for t in tracks}

        # a job that names no models runs the built-in three only: the new entry did not join it
        default = d.ok("batch_start")
        assert d.progress()["models"] == list(BUILT_IN) and default["job_id"] != started["job_id"]
        d.ok("batch_cancel")
        assert d.wait_final()["status"] in ("cancelled", "completed")
    finally:
        d.stop()


def test_the_fourth_backends_setting_flag_and_names(root):
    """Its --stats-model flag and EMBEDD_STATS_MODEL come from the catalogue, like the built-ins'."""
    plugin = _plugin_dir(root, {"stats": "tests.stats_model:INFO"})
    probe = (
        "from embedd.settings import build_settings, Settings, env_names;"
        "s = build_settings();"
        "print(s.model_source('stats'), s.model_id('stats'), env_names('stats_model')[0],"
        " Settings.model_fields['stats_model'].description)"
    )
    env = {"PYTHONPATH": str(plugin), "EMBEDD_STATS_MODEL": "log-mel-16", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=3) == [
        "log-mel-16",
        "log-mel-16",
        "EMBEDD_STATS_MODEL",
        "Log-mel statistics: log-mel-N for N mel bands.\n",
    ]
    helped = subprocess.run(
        [sys.executable, "-m", "embedd", "serve", "--help"],
        env={"PYTHONPATH": str(plugin), "PATH": "/usr/bin:/bin"}, cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--stats-model" in helped.stdout and "EMBEDD_STATS_MODEL" in helped.stdout
