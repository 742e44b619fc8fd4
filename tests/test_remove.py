"""`retro remove`: tombstoned documents are never returned by a search again, as one committed version."""

import json
import shutil

import numpy as np
import pytest

from retrocli import index as index_module
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex
from retrocli.neighbors import query_neighbors
from retrocli.options import NeighborOptions
from retrocli.remove import remove_documents


@pytest.fixture
def db_copy(tiny_db, tmp_path):
    shutil.copytree(tiny_db, tmp_path / "db")
    return tmp_path / "db"


def test_removed_documents_are_never_returned(db_copy):
    db = open_db(db_copy)
    text = db.document_text(3)[:400]
    before = query_neighbors(db, [text], k=3)[0][0].neighbors
    assert before[0].doc == 3  # its own text finds it first
    summary = remove_documents(db_copy, docs=[3])
    assert summary["version"] == 2 and summary["removed"] == [3] and summary["live_documents"] == db.num_docs - 1
    after_db = open_db(db_copy)
    assert after_db.removed_chunks.sum() == len(db.doc_chunks(3)) == summary["removed_chunks"]
    after = query_neighbors(after_db, [text], k=3)[0][0].neighbors
    assert len(after) == 3 and all(n.doc != 3 for n in after)
    # every chunk as a query: no result anywhere is a removed chunk, and rows stay full
    ids, _ = ShardedIndex(after_db).search(np.asarray(after_db.array("embeddings")[:], dtype=np.float32), 5)
    assert not np.isin(ids, np.flatnonzero(after_db.removed_chunks)).any() and (ids >= 0).all()
    # ids of the other documents never move
    assert after_db.source(4) == db.source(4) and np.array_equal(after_db.chunk_doc, db.chunk_doc)


def test_filtered_search_gives_what_over_fetching_gives(db_copy, monkeypatch):
    remove_documents(db_copy, docs=[1, 2, 5])
    db = open_db(db_copy)
    vectors = np.asarray(db.array("embeddings")[:], dtype=np.float32)
    wide = ShardedIndex(db, ef=200).search(vectors, 4)
    monkeypatch.setattr(index_module, "FILTER_ABOVE", 0)  # hnswlib's filter for every shard with removals
    filtered = ShardedIndex(db, ef=200).search(vectors, 4)
    assert np.array_equal(wide[0], filtered[0])
    assert not np.isin(filtered[0], np.flatnonzero(db.removed_chunks)).any()


def test_remove_by_source_glob_from_the_cli(db_copy, cli):
    db = open_db(db_copy)
    pattern = f"*{db.location(2).rsplit(':', 1)[0]}:line 3"  # the third line of the corpus file
    result = cli("remove", db_copy, "--source", pattern, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == [2]
    info = json.loads(cli("info", db_copy, "--json").stdout)
    assert info["removed"] == {"documents": 1, "chunks": len(db.doc_chunks(2))} and info["version"] == 2
    again = json.loads(cli("remove", db_copy, "--doc", "2", "--json").stdout)
    assert again["removed"] == [] and again["already_removed"] == 1 and again["version"] == 2


@pytest.mark.parametrize("args, message", [
    ([], "name the documents to remove"),
    (["--source", "*no-such-file*"], "matches no document"),
    (["--doc", "999"], "--doc 999: no such document"),
])
def test_bad_removals_are_one_line_and_change_nothing(db_copy, cli, args, message):
    manifest = (db_copy / "manifest.json").read_bytes()
    result = cli("remove", db_copy, *args)
    assert result.exit_code == 2 and len(result.error_lines) == 1 and message in result.error_lines[0], result.output
    assert (db_copy / "manifest.json").read_bytes() == manifest


def test_removing_every_document_is_refused(db_copy):
    with pytest.raises(RetroError, match="would remove every document"):
        remove_documents(db_copy, sources=["*"])


def test_training_never_sees_removed_documents(db_copy, tmp_path):
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.train import TrainingData, TrainOptions, train

    remove_documents(db_copy, docs=[0, 4])
    nb = batch_neighbors(db_copy, [db_copy], tmp_path / "nb", options=NeighborOptions(k=2, exclude_same_doc=True))
    db = open_db(db_copy)
    ids = open_neighbors(nb).ids
    assert not np.isin(ids, np.flatnonzero(db.removed_chunks)).any()
    data = TrainingData(db, ids, 128, 2, heldout_docs=set(db.removed_docs))
    assert not np.isin(db.chunk_doc[data.starts], [0, 4]).any()
    summary = train(db_copy, nb, tmp_path / "m", TrainOptions(config="tiny", seq_len=128, steps=2, warmup=1),
                    device="cpu")
    assert json.loads((tmp_path / "m" / "retrocli_model.json").read_text())["heldout_documents"] == 2
    assert summary["steps"] == 2
