"""--dask: the same results on a LocalCluster of 2 worker processes as in one process, a killed worker
loses and duplicates nothing, and an interrupted distributed run resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from retrocli.batch_neighbors import batch_neighbors
from retrocli.build_db import build_db
from retrocli.chunk import chunk_corpus
from retrocli.db import load_embeddings, open_db, read_manifest
from retrocli.embed import embed_db
from retrocli.errors import RetroError
from retrocli.index import ShardedIndex
from retrocli.leakage import leakage_report
from retrocli.neighbor_arrays import open_neighbors
from retrocli.options import EmbedOptions, IndexOptions, LeakageOptions, NeighborOptions
from retrocli.progress import NullProgress
from retrocli.staging import staging_path

distributed = pytest.importorskip("distributed")
HELDOUT = Path(__file__).resolve().parents[1] / "examples" / "subset" / "heldout.jsonl"
# Several shards and many blocks, so that work really is spread over both workers.
INDEX = IndexOptions(shard_size=40, threads=1)
# fp32: the tests compare runs with different block sizes, which batch chunks differently; bf16 rounding
# depends on the batch (fp32 here does not), and "auto" is bf16 on CPUs with native bf16.
PRECISION = "fp32"
BLOCK = 16


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.fixture(scope="module")
def local_db(tmp_path_factory, tiny_bert, small_jsonl):
    path = tmp_path_factory.mktemp("local") / "db"
    build_db(
        [small_jsonl], path, index_options=INDEX,
        embed_options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, threads=1, block_size=BLOCK),
    )
    return path


@pytest.fixture(scope="module")
def dask_db(tmp_path_factory, tiny_bert, small_jsonl, client):
    path = tmp_path_factory.mktemp("dask") / "db"
    build_db(
        [small_jsonl], path, index_options=INDEX, dask=client,
        embed_options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, threads=1, block_size=BLOCK),
    )
    return path


def _array(db_path: Path, name: str) -> np.ndarray:
    return zarr.open_group(str(db_path / "store.zarr"), mode="r")[name][:]


def test_build_db_on_dask_equals_single_process(local_db, dask_db, client):
    local, remote = open_db(local_db), open_db(dask_db)
    assert remote.stage("embed") == remote.stage("index") == "complete"
    assert local.num_chunks > 5 * BLOCK  # the work was split into many tasks
    np.testing.assert_array_equal(_array(remote.path, "chunks/tokens"), _array(local.path, "chunks/tokens"))
    np.testing.assert_array_equal(_array(remote.path, "embeddings"), _array(local.path, "embeddings"))
    shards = remote.manifest["index"]["shards"]
    assert [s["shard"] for s in shards] == list(range(len(shards))) and len(shards) >= 3
    assert shards == local.manifest["index"]["shards"]
    for shard in shards:  # one thread, same seed, same vectors: the same graph byte for byte
        assert (remote.path / shard["file"]).read_bytes() == (local.path / shard["file"]).read_bytes()
    queries = load_embeddings(local)[::7]
    ids_l, d_l = ShardedIndex(local).search(queries, 5)
    ids_r, d_r = ShardedIndex(remote).search(queries, 5)
    np.testing.assert_array_equal(ids_r, ids_l)
    np.testing.assert_array_equal(d_r, d_l)
    assert not list((remote.path / "index").glob("*.partial"))


def test_batch_neighbors_on_dask_equal_single_process(local_db, tmp_path, client):
    local = batch_neighbors(
        local_db, [local_db], tmp_path / "nb-local",
        options=NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK),
    )
    remote = batch_neighbors(
        local_db, [local_db], tmp_path / "nb-dask", dask=client,
        options=NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK),
    )
    a, b = open_neighbors(local), open_neighbors(remote)
    assert b.manifest["status"] == "complete" and "done_blocks" not in b.manifest
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_array_equal(b.distances, a.distances)
    chunk_doc = open_db(local_db).chunk_doc
    assert (chunk_doc[b.ids] != chunk_doc[:, None]).all()  # --exclude-same-doc held on the workers too


def test_batch_neighbors_of_a_corpus_embed_on_dask(local_db, tmp_path, client):
    local = open_neighbors(batch_neighbors(local_db, [HELDOUT], tmp_path / "a", options=NeighborOptions(k=2)))
    remote = open_neighbors(batch_neighbors(
        local_db, [HELDOUT], tmp_path / "b", dask=client, options=NeighborOptions(k=2),
    ))
    np.testing.assert_array_equal(remote.ids, local.ids)
    np.testing.assert_array_equal(
        _array(tmp_path / "b" / "queries", "embeddings"), _array(tmp_path / "a" / "queries", "embeddings")
    )


def test_leakage_report_on_dask_equals_single_process(local_db, client):
    before = sorted((p, p.stat().st_mtime_ns) for p in local_db.rglob("*") if p.is_file())
    local = leakage_report(local_db, [HELDOUT], options=LeakageOptions(k=4)).to_json()
    remote = leakage_report(local_db, [HELDOUT], dask=client, options=LeakageOptions(k=4)).to_json()
    for report in (local, remote):  # wall-clock figures differ from run to run
        report.pop("timings", None)
        for key in ("seconds", "docs_per_second"):
            report["near_duplicate_stats"].pop(key)
    assert remote == local
    assert local["num_test_chunks"] > 0 and local["documents"]
    assert sorted((p, p.stat().st_mtime_ns) for p in local_db.rglob("*") if p.is_file()) == before


def test_interrupted_dask_embed_resumes_to_the_same_array(local_db, tiny_bert, small_jsonl, tmp_path, client):
    path = tmp_path / "db"
    chunk_corpus([small_jsonl], path)
    embed_db(
        path, max_blocks=3, dask=client,
        options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, threads=1, block_size=BLOCK),
    )
    state = read_manifest(path)["stages"]["embed"]
    assert state["status"] == "running" and len(state["done_blocks"]) == 3
    embed_db(
        path, dask=client,
        options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, threads=1, block_size=BLOCK),
    )
    assert open_db(path).stage("embed") == "complete"
    np.testing.assert_array_equal(_array(path, "embeddings"), _array(local_db, "embeddings"))


def test_fp32_embeddings_on_dask_equal_a_process_with_more_torch_threads(tiny_bert, tmp_path, client):
    """One process on 2 torch threads vs Dask workers on 1: the same vectors bit for bit. Documents of 1 to
    37 words give BERT batches of one text, the small matmuls whose fp32 rounding moved with the thread
    count (a one-process build used to differ from --dask local:2 by one fp16 ulp in a few rows)."""
    words = HELDOUT.read_text(encoding="utf-8").split()
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i : i + 1 + i % 37])}) + "\n"
                              for i in range(0, 20 * 150, 20)))
    local, remote = tmp_path / "local", tmp_path / "remote"
    for path in (local, remote):
        chunk_corpus([corpus], path)
    embed_db(local, options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, threads=2, block_size=BLOCK))
    embed_db(remote, dask=client, options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, block_size=BLOCK))
    assert open_db(remote).stage("embed") == "complete"
    assert _array(local, "embeddings").tobytes() == _array(remote, "embeddings").tobytes()


class KillOnFirstBlock(NullProgress):
    """Progress that SIGKILLs one worker process when the first block is reported done."""

    def __init__(self, client):
        self.client, self.killed_at = client, None

    def start(self, name, total, unit="", completed=0):
        outer = self

        class Task:
            done = completed

            def advance(self, n=1):
                Task.done += n
                if outer.killed_at is None:
                    pids = outer.client.run(os.getpid)
                    os.kill(sorted(pids.values())[0], signal.SIGKILL)
                    outer.killed_at = (Task.done, total, pids)

            def finish(self):
                pass

            def note(self, text):
                pass

        return Task()


def test_worker_killed_mid_embed_loses_and_duplicates_nothing(local_db, tiny_bert, small_jsonl, tmp_path, client):
    path = tmp_path / "db"
    chunk_corpus([small_jsonl], path)
    progress = KillOnFirstBlock(client)
    embed_db(
        path, progress=progress, dask=client,
        options=EmbedOptions(embedder=tiny_bert, precision=PRECISION, threads=1, block_size=4),
    )
    done_when_killed, total, pids_before = progress.killed_at
    assert done_when_killed < total / 2  # most blocks were still to do when the worker died
    assert open_db(path).stage("embed") == "complete"
    np.testing.assert_array_equal(_array(path, "embeddings"), _array(local_db, "embeddings"))
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker
    assert set(client.run(os.getpid).values()) != set(pids_before.values())


def test_cli_build_db_with_local_cluster(tiny_bert, small_jsonl, local_db, tmp_path):
    out = tmp_path / "db"
    proc = subprocess.run(
        [sys.executable, "-m", "retrocli.cli", "build-db", str(small_jsonl), "--out", str(out), "--embedder", tiny_bert,
         "--threads", "1", "--block-size", str(BLOCK), "--shard-size", "40", "--dask", "local:2",
         "--precision", PRECISION],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Dask: 2 worker(s)" in proc.stderr
    np.testing.assert_array_equal(_array(out, "embeddings"), _array(local_db, "embeddings"))


@pytest.mark.parametrize(("address", "message"), [
    ("local:0", "expected local:N"),
    ("local:two", "expected local:N"),
    ("tcp://127.0.0.1:9", "cannot reach the Dask scheduler"),
])
def test_bad_dask_address_is_one_line(tiny_db_path_for_errors, address, message):
    proc = subprocess.run([sys.executable, "-m", "retrocli.cli", "index", str(tiny_db_path_for_errors),
                           "--dask", address], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def tiny_db_path_for_errors(local_db, tmp_path):
    dest = tmp_path / "db"
    shutil.copytree(local_db, dest)
    return dest


def test_without_dask_flag_dask_is_never_imported(tiny_bert, small_jsonl, tmp_path):
    script = (
        "import sys, json\n"
        "from retrocli.build_db import build_db\n"
        "from retrocli.batch_neighbors import batch_neighbors\n"
        "from retrocli.options import EmbedOptions, NeighborOptions\n"
        f"db = build_db([{str(small_jsonl)!r}], {str(tmp_path / 'db')!r}, "
        f"embed_options=EmbedOptions({tiny_bert!r}, block_size=64))\n"
        f"batch_neighbors(db.path, [db.path], {str(tmp_path / 'nb')!r}, NeighborOptions(k=2))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_an_error_inside_a_task_reaches_the_client_as_one_retro_error(tiny_bert, small_jsonl, tmp_path, client):
    from retrocli.cluster import run_blocks
    from retrocli.embed import embed_block

    path = tmp_path / "db"
    chunk_corpus([small_jsonl], path)
    with pytest.raises(RetroError, match="other weights than on the client"):
        args = (str(path), tiny_bert, "fp32", 32, 1, BLOCK, "0" * 64, "cpu", None)
        list(run_blocks(client, "embed", embed_block, args, [0, 1]))


def test_dask_with_a_single_query_is_refused(local_db, cli):
    result = cli("neighbors", local_db, "--query", "hello", "--dask", "local:1")
    assert result.exit_code == 2 and "batch mode" in result.output


# -- chunk --dask: pieces tokenized as tasks, appended in corpus order --------------------------------------

def _mixed_corpus(make_corpus, small_jsonl):
    """Every kind of piece: a JSONL file cut into line ranges, Parquet row groups, gzip, text, a binary
    file, empty records and ids on some records only."""
    from helpers import SUBSET_TRAIN

    texts = [json.loads(line)["text"][:1500] for line in SUBSET_TRAIN.read_text(encoding="utf-8").splitlines()[:90]]
    records = [{"text": text} for text in texts[:60]]
    for i, record in enumerate(records):
        if i % 3 == 0:
            record["id"] = f"doc-{i}"
    records[5]["text"] = "   "
    return make_corpus({
        "a/big.jsonl": records,
        "b/rows.parquet": [{"text": text} for text in texts[60:80]] * 80,
        "c/small.jsonl.gz": [{"text": text} for text in texts[80:90]],
        "d/notes.txt": "plain text document. " * 300,
        "e/blob.txt": b"\x00\x01binary",
    })


def _db_arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path / "store.zarr"), mode="r")
    return {name: root[name][:] for name in ("chunks/tokens", "chunks/length", "chunks/doc", "docs/chunk_offset",
                                             "docs/file", "docs/position", "files/path", "docs/external_id")
            if name in root}


def test_chunk_on_dask_equals_single_process(make_corpus, small_jsonl, tmp_path, client):
    from retrocli.corpus import expand_inputs, plan_pieces

    corpus = _mixed_corpus(make_corpus, small_jsonl)
    pieces = plan_pieces(expand_inputs([corpus]), piece_bytes=4096)
    assert sum(p.path.endswith("big.jsonl") for p in pieces) >= 4  # one file, several tasks
    assert sum(p.row_group is not None for p in pieces) >= 2
    local = chunk_corpus([corpus], tmp_path / "local")
    remote = chunk_corpus([corpus], tmp_path / "dask", dask=client, piece_bytes=4096)
    a, b = _db_arrays(local.path), _db_arrays(remote.path)
    assert a.keys() == b.keys() and "docs/external_id" in a
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert remote.manifest["counts"] == local.manifest["counts"]
    assert remote.manifest["stages"]["chunk"]["corpus"] == local.manifest["stages"]["chunk"]["corpus"]
    assert remote.manifest["stages"]["chunk"]["files"] == local.manifest["stages"]["chunk"]["files"]
    assert not (tmp_path / "dask" / "pieces").exists() and not staging_path(tmp_path / "dask").exists()


def test_chunk_on_dask_reports_the_first_bad_record_in_corpus_order(make_corpus, small_jsonl, tmp_path, client):
    from helpers import SUBSET_TRAIN

    lines = [json.dumps({"text": json.loads(line)["text"][:1500]})
             for line in SUBSET_TRAIN.read_text(encoding="utf-8").splitlines()[:40]]
    bad = lines[:25] + ['{"text": 3}'] + lines[25:] + ["not json"]
    corpus = make_corpus({"a.jsonl": bad, "b.jsonl": ["{broken"]})
    with pytest.raises(RetroError) as single:
        chunk_corpus([corpus], tmp_path / "one")
    with pytest.raises(RetroError) as spread:
        chunk_corpus([corpus], tmp_path / "many", dask=client, piece_bytes=2048)
    assert str(spread.value) == str(single.value) and ":26:" in str(single.value)
    assert not (tmp_path / "many").exists() and not (tmp_path / "many.partial").exists()


def test_cli_chunk_with_dask(small_jsonl, tmp_path, cli):
    result = cli("chunk", str(small_jsonl), "--out", str(tmp_path / "db"), "--dask", "local:2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"] == read_manifest(tmp_path / "db")["counts"]


def test_near_duplicates_on_dask_find_the_same_pairs(local_db, tmp_path, client, monkeypatch):
    from retrocli import near_duplicates as nd

    db = open_db(local_db)
    texts = [db.document_text(1), db.document_text(5)]
    texts.append(db.document_text(3).upper() + " And one sentence more at the end.")  # re-cased, extended
    texts.append("Entirely unrelated prose about tide pools, kelp and the migrations of shorebirds. " * 6)
    texts.append("short")
    corpus = tmp_path / "test.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    test = chunk_corpus([corpus], tmp_path / "test-db")
    monkeypatch.setattr(nd, "DOCS_PER_TASK", 3)  # many signature tasks, so the shuffle really groups across them
    monkeypatch.setattr(nd, "PAIRS_PER_TASK", 1)
    for normalize in ("text", "none"):
        local_pairs, local_stats = nd.near_duplicates(db, test, normalize=normalize)
        spread_pairs, spread_stats = nd.near_duplicates(db, test, normalize=normalize, dask=client)
        assert [p.__dict__ for p in spread_pairs] == [p.__dict__ for p in local_pairs]
        found = {p.test_doc for p in local_pairs}  # the copies were found, so the comparison can fail
        assert found >= ({0, 1, 2} if normalize == "text" else {0, 1}) and 3 not in found
        for stats in (local_stats, spread_stats):
            stats.pop("seconds"), stats.pop("docs_per_second")
        assert spread_stats == local_stats and local_stats["short_documents_skipped"]["test"] == 1
