"""Every index kind on real indexes: exact top-k when re-ranking covers the DB, removals and exclusions never
returned, damaged files refused in one line, add-then-search, and byte-identical seeded builds."""

import json
import shutil

import numpy as np
import pytest

from retrocli.db import load_embeddings, open_db
from retrocli.index import ShardedIndex, index_db, remove_index
from retrocli.index_kinds import auto_nlist, exact_distances, pq_bits
from retrocli.neighbors import search_excluding
from retrocli.options import IndexOptions
from retrocli.remove import remove_documents

KINDS = ("hnsw", "ivfpq")


def exhaustive(db, kind: str) -> IndexOptions:
    """Options under which a kind must give the exact top-k on a tiny DB: hnsw with a wide beam; ivfpq
    probing every list and re-ranking every chunk."""
    if kind == "hnsw":
        return IndexOptions(kind="hnsw")
    return IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16, nprobe=4, rerank=db.num_chunks)


def reindexed(path, options: IndexOptions):
    remove_index(path)
    return index_db(path, options)


def brute_force(vectors, queries, k, allowed=None):
    d = exact_distances(queries, np.broadcast_to(vectors, (len(queries), *vectors.shape)), "l2")
    if allowed is not None:
        d = np.where(allowed[None, :], d, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(vectors)), d.shape), d), axis=1)[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_returns_the_exact_top_k_when_reranking_covers_the_db(tiny_db_copy, kind):
    db = reindexed(tiny_db_copy, exhaustive(open_db(tiny_db_copy), kind))
    assert db.manifest["index"]["kind"] == kind
    vectors = load_embeddings(db)
    ids, dists = ShardedIndex(db, ef=500).search(vectors[:25], 6)
    exact_ids, exact_d = brute_force(vectors, vectors[:25], 6)
    np.testing.assert_allclose(dists, exact_d, rtol=1e-4, atol=1e-5)
    assert (ids == exact_ids).all()


def test_ivfpq_is_much_smaller_than_hnsw_and_its_rerank_restores_true_distances(tiny_db_copy):
    db = reindexed(tiny_db_copy, IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16, rerank=0))
    shard = db.manifest["index"]["shards"][0]
    vectors = load_embeddings(db)
    approx_ids, approx_d = ShardedIndex(db).search(vectors[:10], 3)
    _, exact_d = brute_force(vectors, vectors[:10], 3)
    assert not np.allclose(approx_d, exact_d, atol=1e-3)  # without re-ranking: PQ distances
    _, reranked_d = ShardedIndex(db, rerank=50).search(vectors[:10], 3)
    np.testing.assert_allclose(reranked_d, exact_d, rtol=1e-4, atol=1e-5)
    # 16-byte codes + 8-byte ids per vector, plus the codebooks every file carries
    per_vector = (shard["bytes"] - db.manifest["index"]["trained"]["bytes"]) / shard["count"]
    assert 16 <= per_vector <= 40


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("filtering", ["over-fetch", "filter"])
def test_removed_documents_never_come_back_on_any_kind(tiny_db_copy, kind, filtering, monkeypatch):
    import retrocli.index as index_module

    if filtering == "filter":
        monkeypatch.setattr(index_module, "FILTER_ABOVE", 0)
    db = reindexed(tiny_db_copy, exhaustive(open_db(tiny_db_copy), kind))
    vectors = load_embeddings(db)
    gone = list(range(0, db.num_docs, 2))
    remove_documents(tiny_db_copy, docs=gone)
    db = open_db(tiny_db_copy)
    removed = db.removed_chunks
    assert removed.sum() > 0
    index = ShardedIndex(db, ef=500)
    ids, dists = index.search(vectors[removed][:15], 5)
    assert not removed[ids[ids >= 0]].any()
    exact_ids, exact_d = brute_force(vectors, vectors[removed][:15], 5, allowed=~removed)
    assert (ids == exact_ids).all()
    if kind == "ivfpq":  # the live-chunk bitmap is packed once for the DB version, not once per search
        [(shard, _, _)] = index.loaded.values()
        packed = shard._filter
        assert packed is not None and packed[0] is index.allowed
        index.search(vectors[:3], 5)
        assert shard._filter is packed


@pytest.mark.parametrize("kind", KINDS)
def test_same_document_and_id_exclusions_hold_on_any_kind(tiny_db_copy, kind):
    db = reindexed(tiny_db_copy, exhaustive(open_db(tiny_db_copy), kind))
    vectors = load_embeddings(db)
    index = ShardedIndex(db, ef=500)
    queries = vectors[:30]
    own = db.chunk_doc[:30]
    ids, _ = search_excluding(index, queries, 4, own, db.chunk_doc)
    assert (ids >= 0).all() and (db.chunk_doc[ids] != own[:, None]).all()
    banned = [{int(own[q]), int(own[q]) + 1} for q in range(30)]
    ids, _ = search_excluding(index, queries, 4, None, db.chunk_doc, banned)
    for q in range(30):
        assert not set(db.chunk_doc[ids[q]].tolist()) & banned[q]


@pytest.mark.parametrize("kind", KINDS)
def test_a_seeded_build_is_byte_identical(tiny_db_copy, tmp_path, kind):
    options = IndexOptions(kind=kind, nlist=4, pq_bytes=16, seed=7, shard_size=50)
    other = tmp_path / "other"
    shutil.copytree(tiny_db_copy, other)
    first, second = reindexed(tiny_db_copy, options), reindexed(other, options)
    files = lambda db: [r["sha256"] for r in db.manifest["index"]["shards"]]  # noqa: E731
    assert files(first) == files(second) and len(files(first)) > 1
    if kind == "ivfpq":
        assert first.manifest["index"]["trained"]["sha256"] == second.manifest["index"]["trained"]["sha256"]
        third = reindexed(other, IndexOptions(kind=kind, nlist=4, pq_bytes=16, seed=8, shard_size=50))
        assert third.manifest["index"]["trained"]["sha256"] != first.manifest["index"]["trained"]["sha256"]


def test_ivfpq_shards_merge_exactly(tiny_db_copy):
    """Many shards share one trained quantiser: their merged, re-ranked top-k is the single shard's."""
    options = IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16, nprobe=4, rerank=40)
    queries = load_embeddings(open_db(tiny_db_copy))[::5]
    one = ShardedIndex(reindexed(tiny_db_copy, options)).search(queries, 5)
    options.shard_size = 30
    many = ShardedIndex(reindexed(tiny_db_copy, options)).search(queries, 5)
    assert (one[0] == many[0]).mean() > 0.95  # each shard keeps its own top 40: at least as many candidates


def test_search_settings_change_without_a_rebuild(tiny_db_copy):
    options = IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16)
    db = reindexed(tiny_db_copy, options)
    shard = db.manifest["index"]["shards"][0]["sha256"]
    options.nprobe, options.rerank = 2, 10
    db = index_db(tiny_db_copy, options)
    assert (db.manifest["index"]["nprobe"], db.manifest["index"]["rerank"]) == (2, 10)
    assert db.manifest["index"]["shards"][0]["sha256"] == shard
    index = ShardedIndex(db)
    assert (index.nprobe, index.rerank) == (2, 10)


def test_bad_kind_options_are_one_line(tiny_db_copy):
    from retrocli.errors import RetroError

    with pytest.raises(RetroError, match="--kind: must be one of hnsw, ivfpq"):
        index_db(tiny_db_copy, IndexOptions(kind="scann"))
    remove_index(tiny_db_copy)
    with pytest.raises(RetroError, match="--pq-bytes: must divide the vectors' dimension"):
        index_db(tiny_db_copy, IndexOptions(kind="ivfpq", pq_bytes=7))


@pytest.mark.parametrize("target", ["shard", "trained"])
def test_a_damaged_ivfpq_file_is_one_line(tiny_db_copy, retro_proc, target):
    db = reindexed(tiny_db_copy, IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16))
    record = db.manifest["index"]["shards"][0] if target == "shard" else db.manifest["index"]["trained"]
    path = tiny_db_copy / record["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = retro_proc("verify", str(tiny_db_copy))
    assert result.exit_code != 0 and "sha256 differs" in result.stdout + result.stderr
    if target == "shard":
        result = retro_proc("neighbors", str(tiny_db_copy), "--query", "some text to look up")
        assert result.exit_code != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0 and path.name in result.stderr


def test_a_truncated_faiss_file_with_a_matching_record_is_one_line(tiny_db_copy, retro_proc):
    """Even a file whose record was rewritten to match (so the checksum passes) never reaches faiss as
    a traceback."""
    from retrocli.checksums import file_sha256

    db = reindexed(tiny_db_copy, IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16))
    manifest = json.loads((tiny_db_copy / "manifest.json").read_text())
    record = manifest["index"]["shards"][0]
    path = tiny_db_copy / record["file"]
    path.write_bytes(path.read_bytes()[: record["bytes"] // 2])
    record["bytes"], record["sha256"] = path.stat().st_size, file_sha256(path)
    (tiny_db_copy / "manifest.json").write_text(json.dumps(manifest))
    result = retro_proc("neighbors", str(tiny_db_copy), "--query", "some text to look up")
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert "cannot load index shard" in result.stderr and db.num_chunks > 0


def test_auto_nlist_and_pq_bits_follow_the_data_size():
    assert auto_nlist(84_188) == 1024 and auto_nlist(300) == 4 and auto_nlist(10) == 1
    assert pq_bits(300_000) == 8 and pq_bits(200) == 5


def test_ivfpq_codes_are_4_bit_fast_scan_where_the_split_allows_and_8_bit_otherwise(tmp_path):
    """A DB's codes use faiss's fast-scan layout (2·pq_bytes 4-bit sub-spaces, the same bytes); where
    2·pq_bytes does not divide the dimension, or a kNN-LM datastore asks for them, codes stay 8-bit."""
    import faiss

    from retrocli.index_kinds import IvfPqParams, train_ivfpq

    sample = np.random.default_rng(0).standard_normal((2048, 48)).astype(np.float32)
    for params, factory, fast_type in (
        (IvfPqParams(8, 12, False, fast_scan=True), "IVF8,PQ24x4fs", True),
        (IvfPqParams(8, 16, False, fast_scan=True), "IVF8,PQ16x8", False),  # 32 does not divide 48
        (IvfPqParams(8, 12, False), "IVF8,PQ12x8", False),
    ):
        record = train_ivfpq(sample, "l2", params, 8, 0, 1, tmp_path / "trained.faiss")
        assert record["factory"] == factory and record["fast_scan"] == fast_type
        index = faiss.read_index(str(tmp_path / "trained.faiss"))
        assert isinstance(index, faiss.IndexIVFPQFastScan) == fast_type
        assert faiss.extract_index_ivf(index).code_size == params.pq_bytes


def recall_at_10(db, queries, exact_ids):
    found, _ = ShardedIndex(db).search(queries, 10)
    return np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact_ids)])


def test_ivfpq_add_then_search_equals_build_then_search(tmp_path, small_jsonl, tiny_bert):
    """`retro add` adds the new vectors to the DB's trained quantisers (no retraining); its search stays
    within 0.02 recall@10 of an ivfpq index trained on everything. Removed and compacted, the kind stays."""
    from retrocli.add import add_documents
    from retrocli.build_db import build_db
    from retrocli.compact import compact_db
    from retrocli.options import EmbedOptions
    from retrocli.verify import verify_db

    lines = small_jsonl.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[8:]) + "\n")
    options = IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16, rerank=30)
    embed = EmbedOptions(embedder=tiny_bert, block_size=16)
    added = build_db([tmp_path / "a.jsonl"], tmp_path / "added", embed_options=embed, index_options=options)
    trained = added.manifest["index"]["trained"]["sha256"]
    add_documents(tmp_path / "added", [tmp_path / "b.jsonl"])
    added = open_db(tmp_path / "added")
    both = build_db([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "both", embed_options=embed,
                    index_options=options)
    assert added.manifest["index"]["trained"]["sha256"] == trained  # trained once
    assert added.manifest["index"]["shards"][-1]["file"].endswith(".faiss")
    assert verify_db(tmp_path / "added").ok
    vectors = load_embeddings(both)
    exact_ids, _ = brute_force(vectors, vectors, 10)
    assert recall_at_10(added, vectors, exact_ids) >= recall_at_10(both, vectors, exact_ids) - 0.02
    new_chunk = added.num_chunks - 1
    assert ShardedIndex(added).search(vectors[new_chunk : new_chunk + 1], 1)[0][0, 0] == new_chunk

    remove_documents(tmp_path / "added", docs=[0])
    compacted = compact_db(tmp_path / "added", tmp_path / "compacted")
    assert compacted.manifest["index"]["kind"] == "ivfpq" and compacted.manifest["index"]["rerank"] == 30
    assert verify_db(tmp_path / "compacted").ok
    assert compacted.num_chunks == added.num_chunks - int(added.chunk_doc.__eq__(0).sum())


def test_a_read_command_overrides_nprobe_and_rerank_for_its_run_only(tiny_db_copy, tiny_db, retro_proc):
    """`retro neighbors --rerank 0` answers with the codes' distances and the recorded --rerank with the true
    ones, and the DB's manifest stays as it was; an hnsw DB refuses ivfpq's options in one line."""
    db = reindexed(tiny_db_copy, exhaustive(open_db(tiny_db_copy), "ivfpq"))
    manifest = (tiny_db_copy / "manifest.json").read_bytes()
    query = db.document_text(2)[:300]

    def distances(*options):
        result = retro_proc("neighbors", tiny_db_copy, "--query", query, "--k", "3", "--json", *options)
        assert result.exit_code == 0, result.stderr
        return np.array([n["distance"] for n in json.loads(result.stdout)["chunks"][0]["neighbors"]])

    exact, coded = distances(), distances("--rerank", "0")
    assert not np.allclose(exact, coded, atol=1e-3)
    np.testing.assert_allclose(distances("--rerank", "0", "--nprobe", "4"), coded, rtol=1e-5)
    assert (tiny_db_copy / "manifest.json").read_bytes() == manifest

    vectors = load_embeddings(db)
    exact_ids, _ = brute_force(vectors, vectors[:25], 6)
    one_list, _ = ShardedIndex(db, nprobe=1).search(vectors[:25], 6)  # 1 of 4 lists: neighbours are missed
    assert (one_list != exact_ids).any() and (ShardedIndex(db).search(vectors[:25], 6)[0] == exact_ids).all()

    refused = retro_proc("neighbors", tiny_db, "--query", query, "--nprobe", "8")
    assert refused.exit_code != 0 and "Traceback" not in refused.stderr
    assert "--nprobe: applies to an ivfpq index" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_batch_neighbours_record_the_width_they_searched_with(tiny_db_copy, tmp_path):
    """Batch neighbours (what training, eval and the leakage report read) record the nprobe and rerank in
    force, so neighbours found with other ones are not taken as these."""
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.errors import RetroError
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.options import NeighborOptions

    db = reindexed(tiny_db_copy, exhaustive(open_db(tiny_db_copy), "ivfpq"))
    recorded = open_neighbors(batch_neighbors(db, [tiny_db_copy], tmp_path / "recorded", NeighborOptions(k=3)))
    assert recorded.manifest["settings"]["nprobe"] == 4 and recorded.manifest["settings"]["rerank"] == db.num_chunks
    coded = open_neighbors(batch_neighbors(db, [tiny_db_copy], tmp_path / "coded", NeighborOptions(k=3, rerank=0)))
    assert coded.manifest["settings"]["rerank"] == 0
    assert not np.allclose(np.asarray(coded.distances), np.asarray(recorded.distances), atol=1e-3)
    with pytest.raises(RetroError, match="other settings; pass --overwrite"):
        batch_neighbors(db, [tiny_db_copy], tmp_path / "coded", NeighborOptions(k=3, rerank=5))
