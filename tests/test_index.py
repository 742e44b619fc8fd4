import json
import shutil

import numpy as np
import pytest

from retrocli.db import load_embeddings, open_db
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex, index_db, remove_index
from retrocli.options import EmbedOptions, IndexOptions


def brute_force(vectors, queries, k):
    d = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k], np.sort(d, axis=1)[:, :k]


def test_manifest_records_index(tiny_db):
    db = open_db(tiny_db)
    idx = db.manifest["index"]
    assert idx["space"] == "l2" and idx["M"] == 32 and len(idx["shards"]) == 1
    assert (tiny_db / idx["shards"][0]["file"]).stat().st_size == idx["shards"][0]["bytes"]
    assert idx["shards"][0]["count"] == db.num_chunks


def test_search_is_squared_l2_and_matches_brute_force(tiny_db):
    db = open_db(tiny_db)
    vectors = load_embeddings(db)
    ids, dists = ShardedIndex(db, ef=400).search(vectors[:20], 5)
    exact_ids, exact_d = brute_force(vectors, vectors[:20], 5)
    np.testing.assert_allclose(dists, exact_d, rtol=1e-4, atol=1e-5)
    assert (ids[:, 0] == np.arange(20)).all()


def test_sharded_search_equals_single_shard(tiny_db_copy, tmp_path):
    single = ShardedIndex(open_db(tiny_db_copy), ef=500)
    queries = load_embeddings(open_db(tiny_db_copy))[::3]
    ids1, d1 = single.search(queries, 7)
    remove_index(tiny_db_copy)
    db = index_db(tiny_db_copy, IndexOptions(shard_size=17))
    assert len(db.manifest["index"]["shards"]) == -(-db.num_chunks // 17)
    ids2, d2 = ShardedIndex(db, ef=500).search(queries, 7)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)
    assert (ids1 == ids2).all()


def test_interrupted_index_resumes_at_next_shard(tiny_db_copy):
    remove_index(tiny_db_copy)
    index_db(tiny_db_copy, IndexOptions(shard_size=40))
    manifest = json.loads((tiny_db_copy / "manifest.json").read_text())
    first = tiny_db_copy / manifest["index"]["shards"][0]["file"]
    mtime = first.stat().st_mtime_ns
    # simulate a kill after the first shard: drop the later shards from the manifest, mark running
    manifest["index"]["shards"] = manifest["index"]["shards"][:1]
    manifest["stages"]["index"]["status"] = "running"
    (tiny_db_copy / "manifest.json").write_text(json.dumps(manifest))
    leftover = tiny_db_copy / "index" / "shard-00001.4242.partial"  # a save cut short by the kill
    leftover.write_bytes(b"half a shard")
    db = index_db(tiny_db_copy, IndexOptions(shard_size=40))
    assert db.stage("index") == "complete" and first.stat().st_mtime_ns == mtime
    assert not list((tiny_db_copy / "index").glob("*.partial"))
    assert sum(s["count"] for s in db.manifest["index"]["shards"]) == db.num_chunks
    with pytest.raises(RetroError, match="other parameters"):
        index_db(tiny_db_copy, IndexOptions(shard_size=41))


@pytest.mark.parametrize("space", ["ip", "cosine"])
def test_other_spaces(tiny_db_copy, space):
    remove_index(tiny_db_copy)
    db = index_db(tiny_db_copy, IndexOptions(space=space))
    vectors = load_embeddings(db)
    ids, dists = ShardedIndex(db, ef=400).search(vectors[:3], 3)
    if space == "cosine":  # hnswlib's cosine is 1 - cos; ip is 1 - dot
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = 1 - unit[:3] @ unit.T
    else:
        scores = 1 - vectors[:3] @ vectors.T
    ref_d = np.sort(scores, axis=1)[:, :3]
    np.testing.assert_allclose(dists, ref_d, rtol=1e-4, atol=1e-5)


def test_missing_and_corrupt_shards_are_clean_errors(tiny_db_copy, cli):
    shard = next((tiny_db_copy / "index").glob("*.hnsw"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    result = cli("neighbors", tiny_db_copy, "--query", "classes")
    assert result.exit_code != 0 and "corrupt" in result.output and result.exception is None
    shard.unlink()
    result = cli("neighbors", tiny_db_copy, "--query", "classes")
    assert result.exit_code != 0 and "missing" in result.output and result.exception is None


def test_index_before_embed_is_refused(tmp_path, small_jsonl):
    from retrocli.chunk import chunk_corpus

    db = chunk_corpus([small_jsonl], tmp_path / "db")
    with pytest.raises(RetroError, match="embed stage is not complete"):
        index_db(db.path)


def test_bad_space(tiny_db_copy):
    with pytest.raises(RetroError, match="--space"):
        index_db(tiny_db_copy, IndexOptions(space="hamming"))
    shutil.rmtree(tiny_db_copy)


def _index_twice(subset_db, tiny_bert, tmp_path, threads):
    """Two index builds of one embedded copy of the subset (3.7k chunks): shard bytes and neighbours."""
    from retrocli.embed import embed_db

    base = tmp_path / "embedded"
    shutil.copytree(subset_db, base)
    embed_db(base, options=EmbedOptions(embedder=tiny_bert))
    builds = []
    for name in ("a", "b"):
        db_path = tmp_path / name
        shutil.copytree(base, db_path)
        db = index_db(db_path, IndexOptions(threads=threads))
        shard = (db_path / db.manifest["index"]["shards"][0]["file"]).read_bytes()
        ids, _ = ShardedIndex(db).search(load_embeddings(db), 10, threads=2)
        builds.append((shard, ids))
    return builds


def test_the_default_index_build_is_byte_identical_and_so_are_its_neighbours(subset_db, tiny_bert, tmp_path):
    (shard_a, ids_a), (shard_b, ids_b) = _index_twice(subset_db, tiny_bert, tmp_path, threads=None)
    assert shard_a == shard_b
    assert (ids_a == ids_b).all()
