"""Taking over the original system's vectors (issue 23), through one real daemon on Milvus Lite.

The original's ``embedding`` collection holds rows named after a Navidrome
library's tracks ("Artist - Title"), with vectors no model of embedd would
make (so that a re-embedded track would show). ``take_over`` adopts the rows
that name exactly one track and carry the configured model's id, reports the
rest (a name of no track, a name two tracks share, a row of another model),
and the next incremental job embeds only the tracks not adopted; the adopted
ones keep the original's vectors, marked ``?adopted`` in ``model_id``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.batch_fixtures import BatchDaemon, Library, write_audio
from tests.daemon import short_tmpdir
from tests.original_system import create_original_collection

pytestmark = pytest.mark.timeout(300)

DIM = 48  # the tiny MuQ-MuLan's stored width


def _named(lib: Library, artist: str, title: str, index: int):
    real = write_audio(lib.music / artist / f"{index:05d} {title}", index)
    return lib._insert([lib._row(os.path.relpath(real, lib.music), real, artist=artist, title=title)])[0]


def _client(uri: str):
    from pymilvus import MilvusClient

    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri=uri, timeout=30)


def _release(client, uri: str) -> None:
    from milvus_lite.server_manager import server_manager_instance

    client.close()
    server_manager_instance.release_server(uri)


def test_take_over_adopts_what_resolves_and_the_next_job_embeds_the_rest(tiny_models) -> None:
    root = short_tmpdir("to-")
    try:
        lib = Library(root / "lib")
        adoptable = [_named(lib, f"Kept Artist {i}", f"Kept Song {i}", 100 + i) for i in range(4)]
        twins = [_named(lib, "Twin Artist", "Same Song", 200 + i) for i in range(2)]
        fresh = [_named(lib, "New Artist", "Never Embedded", 300)]
        d = BatchDaemon(root / "d", lib, tiny_models)
        uri = str(d.data_dir / "milvus.db")
        rng = np.random.default_rng(23)
        old = rng.standard_normal((7, DIM)).astype(np.float32)
        old /= np.linalg.norm(old, axis=1, keepdims=True)
        names = [f"{t.artist} - {t.title}" for t in adoptable] + [
            "Twin Artist - Same Song", "Gone Artist - Lost Song", "Kept Artist 0 - Other Model",
        ]  # fmt: skip
        ids = [tiny_models["muq"]] * 6 + ["someone/else"]
        client = _client(uri)
        create_original_collection(client, "embedding", old, names, ids)
        _release(client, uri)

        d.start()
        try:
            dry = d.ok("take_over", model="muq", dry_run=True)
            assert dry["dry_run"] is True and dry["models"]["muq"]["adopted"] == 4, str(dry)
            r = d.ok("take_over", model="muq")["models"]["muq"]
            assert r["collections"] == ["embedding"] and r["rows"] == 7
            assert r["adopted"] == 4 and r["already_stored"] == 0
            assert r["unresolved"] == 1 and r["unresolved_names"] == ["Gone Artist - Lost Song"]
            assert r["ambiguous"] == 1
            assert r["ambiguous_names"] == [{"name": "Twin Artist - Same Song", "tracks": sorted(t.track_id for t in twins)}]
            assert r["other_model_id"] == {"someone/else": 1} and r["other_dim"] == 0
            # again: nothing new, the adopted rows are there
            again = d.ok("take_over", model="muq")["models"]["muq"]
            assert again["adopted"] == 0 and again["already_stored"] == 4

            d.ok("batch_start", models=["muq"])
            final = d.wait_final(240)
            assert final["status"] == "completed", final
            assert final["skipped_tracks"] == len(adoptable)  # adopted: not embedded again
            assert final["processed_tracks"] == len(twins) + len(fresh)  # the rest: embedded
        finally:
            d.stop()

        client = _client(uri)
        try:
            from pymilvus.client.cache import GlobalCache

            GlobalCache.schema.clear()
            client.load_collection("embedding")  # a restarted Milvus Lite has every collection released
            every = [t.track_id for t in [*adoptable, *twins, *fresh]]
            quoted = ", ".join(f'"{i}"' for i in every)
            rows = {
                r["track_id"]: r
                for r in client.query("embedding", filter=f"track_id in [{quoted}]", output_fields=["track_id", "model_id", "embedding"])
            }
            assert set(rows) == set(every)
            for i, t in enumerate(adoptable):  # the original's vector, marked adopted
                np.testing.assert_allclose(rows[t.track_id]["embedding"], old[i], rtol=1e-6, atol=1e-7)
                assert rows[t.track_id]["model_id"] == tiny_models["muq"] + "?adopted"
            for t in [*twins, *fresh]:  # embedded by embedd
                assert rows[t.track_id]["model_id"] == tiny_models["muq"]
            assert "embedding__legacy" in client.list_collections()  # the original's rows, kept
        finally:
            _release(client, uri)
    finally:
        shutil.rmtree(root, ignore_errors=True)
