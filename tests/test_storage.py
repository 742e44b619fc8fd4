"""DBs on object storage, against a real S3-compatible server (moto's standalone server, started here on
127.0.0.1): build-db to s3://, read and query it through a fresh cache, resume a build killed with -9,
one writer at a time, and a damaged cached shard fetched again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import RETRO_BIN

from retrocli.build_db import build_db
from retrocli.chunk import chunk_corpus
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.options import EmbedOptions, IndexOptions, NeighborOptions
from retrocli.storage import Mirror, as_location, fetch_db, fetch_input, local_db, local_inputs, mirror_path

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "retro-test"
ARRAYS = ("chunks/tokens", "chunks/length", "chunks/doc", "docs/chunk_offset", "docs/file", "docs/position",
          "embeddings")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env
    proc.terminate()
    proc.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _fs():
    import s3fs

    return s3fs.S3FileSystem()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path / "store.zarr"), mode="r")
    return {name: root[name][:] for name in ARRAYS}


def build_options(tiny_bert: str) -> dict:
    return {"embed_options": EmbedOptions(tiny_bert, "fp32", threads=1, block_size=16),
            "index_options": IndexOptions(shard_size=40, threads=1)}


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, tiny_bert, small_jsonl):
    return build_db([small_jsonl], tmp_path_factory.mktemp("local") / "db", **build_options(tiny_bert)).path


@pytest.fixture(scope="module")
def s3_db(s3_server, tmp_path_factory, tiny_bert, small_jsonl):
    url = f"s3://{BUCKET}/dbs/small"
    with local_db(url, tmp_path_factory.mktemp("writer-cache"), write="test build") as path:
        build_db([small_jsonl], path, **build_options(tiny_bert))
    return url


def test_as_location_restores_the_url_pathlib_collapsed():
    assert as_location(Path("s3://bucket/db")) == "s3://bucket/db"
    assert as_location("file:///tmp/x") == "/tmp/x"
    assert as_location("relative/dir") == "relative/dir"


def test_build_db_to_s3_holds_the_same_arrays_and_shards_as_a_local_build(s3_db, local_build, tmp_path):
    files = _fs().find(f"{BUCKET}/dbs/small")
    assert f"{BUCKET}/dbs/small/manifest.json" in files and not any(f.endswith(".partial") for f in files)
    assert not _fs().exists(f"{BUCKET}/dbs/.small.lock")  # released
    reader = fetch_db(s3_db, tmp_path / "reader-cache")  # a fresh cache: everything comes from the store
    assert reader == mirror_path(s3_db, tmp_path / "reader-cache")
    local, remote = _arrays(local_build), _arrays(reader)
    for name in ARRAYS:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)
    a, b = open_db(local_build).manifest, open_db(reader).manifest
    assert a["index"]["shards"] == b["index"]["shards"] and a["counts"] == b["counts"]


def test_query_and_info_and_verify_a_db_on_s3(s3_db, local_build, tmp_path, cli):
    cache = str(tmp_path / "cache")
    remote = cli("neighbors", s3_db, "--query", "a question about databases", "--k", "3", "--json",
                 "--cache-dir", cache)
    local = cli("neighbors", str(local_build), "--query", "a question about databases", "--k", "3", "--json")
    assert remote.exit_code == 0, remote.output
    got, want = json.loads(remote.stdout), json.loads(local.stdout)
    assert [n["id"] for n in got["chunks"][0]["neighbors"]] == [n["id"] for n in want["chunks"][0]["neighbors"]]
    info = cli("info", s3_db, "--cache-dir", cache, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["counts"] == open_db(local_build).manifest["counts"]
    assert cli("verify", s3_db, "--cache-dir", cache).exit_code == 0


def test_a_url_without_a_cache_dir_is_one_line(s3_server, cli, monkeypatch):
    monkeypatch.delenv("RETRO_CACHE_DIR", raising=False)
    result = cli("info", f"s3://{BUCKET}/dbs/small")
    assert result.exit_code != 0 and "--cache-dir" in result.stderr and "Traceback" not in result.output


def test_a_damaged_cached_shard_is_fetched_again(s3_db, tmp_path):
    cache = tmp_path / "cache"
    path = fetch_db(s3_db, cache)
    shard = path / open_db(path).manifest["index"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    fetch_db(s3_db, cache)
    assert shard.read_bytes() == _fs().cat_file(f"{BUCKET}/dbs/small/{shard.relative_to(path).as_posix()}")


def test_a_second_writer_is_refused_while_the_first_holds_the_store(s3_db, tmp_path):
    with local_db(s3_db, tmp_path / "a", write="first"):
        with pytest.raises(RetroError, match="another writer holds the DB"):
            with local_db(s3_db, tmp_path / "b", write="second"):
                pass
    with local_db(s3_db, tmp_path / "b", write="second"):  # free again
        pass


def test_a_build_killed_mid_embed_resumes_from_the_store_on_a_fresh_cache(s3_server, tiny_bert, small_jsonl,
                                                                           local_build, tmp_path, retro_proc):
    url = f"s3://{BUCKET}/dbs/killed"
    args = ["build-db", str(small_jsonl), "--out", url, "--embedder", tiny_bert, "--precision", "fp32",
            "--threads", "1", "--block-size", "16", "--shard-size", "40"]
    env = {**os.environ, "RETRO_CACHE_DIR": str(tmp_path / "first")}
    proc = subprocess.Popen([sys.executable, "-m", "retrocli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest_key = f"{BUCKET}/dbs/killed/manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the store holds some, not all, embedding blocks
        if _fs().exists(manifest_key):
            stages = json.loads(_fs().cat_file(manifest_key))["stages"]
            if len(stages.get("embed", {}).get("done_blocks", [])) >= 2:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stages = json.loads(_fs().cat_file(manifest_key))["stages"]
    assert stages["embed"]["status"] == "running"
    _fs().invalidate_cache()
    # another machine: a fresh cache; the dead writer's lock (same host, dead pid) is taken over
    result = retro_proc(*args, "--cache-dir", str(tmp_path / "second"))
    assert result.exit_code == 0, result.output
    resumed = fetch_db(url, tmp_path / "check")
    local, remote = _arrays(local_build), _arrays(resumed)
    for name in ARRAYS:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)


def test_mirror_refuses_dot_dot_in_a_url(tmp_path):
    with pytest.raises(RetroError, match="not a DB location"):
        mirror_path("s3://bucket/../etc", tmp_path)
    assert Mirror  # the class is the public face of a mirror


def _upload(local: Path, key: str) -> str:
    _fs().put_file(str(local), f"{BUCKET}/{key}")
    return f"s3://{BUCKET}/{key}"


def test_corpus_inputs_from_a_prefix_chunk_like_local_files(s3_server, small_jsonl, make_corpus, tmp_path):
    corpus = make_corpus({"a.txt": "alpha " * 300, "sub/b.md": "# beta\n" + "gamma delta " * 200})
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            _upload(path, f"corpora/one/{path.relative_to(corpus).as_posix()}")
    url = f"s3://{BUCKET}/corpora/one"
    [fetched] = local_inputs([url], tmp_path / "cache")
    local = chunk_corpus([corpus], tmp_path / "local-db")
    remote = chunk_corpus([fetched], tmp_path / "remote-db")
    assert local.num_docs == remote.num_docs == 2
    a, b = (zarr.open_group(str(db.path / "store.zarr"), mode="r") for db in (local, remote))
    for name in ("chunks/tokens", "chunks/length", "chunks/doc", "docs/chunk_offset"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert sorted(b["files/path"][:].tolist()) == [f"{url}/a.txt", f"{url}/sub/b.md"]  # the URL, not the cache
    # fetched again: unchanged objects stay (same inode), a changed one comes anew
    kept = (fetched / "a.txt").stat().st_ino
    _fs().pipe_file(f"{BUCKET}/corpora/one/sub/b.md", b"# changed\n" + b"word " * 100)
    [again] = local_inputs([url], tmp_path / "cache")
    assert (again / "a.txt").stat().st_ino == kept
    assert (again / "sub" / "b.md").read_bytes().startswith(b"# changed")


def test_a_single_object_input_and_a_missing_one(s3_server, small_jsonl, tmp_path):
    url = _upload(small_jsonl, "corpora/small.jsonl")
    fetched = fetch_input(url, tmp_path / "cache")
    assert fetched.name == "small.jsonl" and fetched.read_bytes() == small_jsonl.read_bytes()
    with pytest.raises(RetroError, match="no such object"):
        fetch_input(f"s3://{BUCKET}/corpora/nothing-here", tmp_path / "cache")


def test_add_remove_and_compact_a_db_on_s3(s3_db, tiny_bert, make_corpus, tmp_path, cli):
    url = f"s3://{BUCKET}/dbs/changing"
    _fs().copy(f"{BUCKET}/dbs/small", f"{BUCKET}/dbs/changing", recursive=True)
    cache = str(tmp_path / "writer")
    new_docs = make_corpus({"new.txt": "an added document about object storage " * 40})
    doc_url = _upload(new_docs / "new.txt", "corpora/new.txt")
    before = open_db(fetch_db(url, tmp_path / "r0")).manifest["counts"]
    added = cli("add", url, doc_url, "--cache-dir", cache, "--json")
    assert added.exit_code == 0, added.output
    # another machine sees the new version; the store holds no lock and no temp file
    after = open_db(fetch_db(url, tmp_path / "r1"))
    assert after.manifest["counts"]["documents"] == before["documents"] + 1 and after.manifest["version"] == 2
    assert not _fs().exists(f"{BUCKET}/dbs/.changing.lock")
    hits = cli("neighbors", url, "--query", "an added document about object storage", "--k", "1", "--json",
               "--cache-dir", str(tmp_path / "r2"))
    assert hits.exit_code == 0, hits.output
    assert json.loads(hits.stdout)["chunks"][0]["neighbors"][0]["source"].endswith("new.txt")
    removed = cli("remove", url, "--doc", str(before["documents"]), "--cache-dir", cache, "--json")
    assert removed.exit_code == 0, removed.output
    out = f"s3://{BUCKET}/dbs/compacted"
    compacted = cli("compact", url, "--out", out, "--cache-dir", cache, "--json")
    assert compacted.exit_code == 0, compacted.output
    fresh = fetch_db(out, tmp_path / "r3")
    assert open_db(fresh).manifest["counts"]["documents"] == before["documents"]
    assert cli("verify", out, "--cache-dir", str(tmp_path / "r3")).exit_code == 0


def test_leakage_report_of_a_db_and_test_set_on_s3_equals_local(s3_db, local_build, small_jsonl, tmp_path, cli):
    test_url = _upload(small_jsonl, "tests/heldout.jsonl")
    remote = cli("leakage-report", s3_db, "--test", test_url, "--k", "2", "--cache-dir", str(tmp_path / "c"),
                 "--json")
    local = cli("leakage-report", str(local_build), "--test", str(small_jsonl), "--k", "2", "--json")
    assert remote.exit_code == 0, remote.output
    got, want = json.loads(remote.stdout), json.loads(local.stdout)
    for key in ("leaking_fraction", "chunks"):
        assert got.get(key) == want.get(key), key
    pairs = lambda report: [(p["db_doc"], p["test_doc"], p["jaccard"]) for p in report["near_duplicates"]]  # noqa: E731
    assert pairs(got) == pairs(want) and pairs(got)
    # the test set's sources name the URL it came from, not this machine's cache
    assert got["near_duplicates"][0]["test_source"].endswith(f"({test_url}:line 1)")


@contextlib.contextmanager
def _workers_with_own_caches(tmp_path: Path):
    """A Dask cluster of 2 worker processes, each with its own RETRO_CACHE_DIR, as on separate machines."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        workers = sorted(client.scheduler_info()["workers"])
        caches = {w: tmp_path / f"worker-{i}" for i, w in enumerate(workers)}
        for worker, cache in caches.items():
            client.run(lambda path=str(cache): os.environ.update(RETRO_CACHE_DIR=path), workers=[worker])
        yield client, caches
    finally:
        client.close()
        cluster.close()


def test_dask_workers_fetch_only_their_own_shards_of_a_db_on_s3(s3_db, local_build, tmp_path):
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.index import SearchWidth
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.shard_owners import OwnedShards

    with _workers_with_own_caches(tmp_path) as (client, caches):
        db_path = fetch_db(s3_db, tmp_path / "client")
        remote = batch_neighbors(
            db_path, [db_path], tmp_path / "nb-s3", dask=client, options=NeighborOptions(k=3, exclude_same_doc=True),
        )
        local = batch_neighbors(
            local_build, [local_build], tmp_path / "nb-local", options=NeighborOptions(k=3, exclude_same_doc=True),
        )
        np.testing.assert_array_equal(open_neighbors(remote).ids, open_neighbors(local).ids)
        db = open_db(db_path)
        files = {int(s["shard"]): s["file"] for s in db.manifest["index"]["shards"]}
        assert len(files) >= 2
        for worker, shards in OwnedShards(client, db, SearchWidth(128)).placement().items():
            copy = mirror_path(s3_db, caches[worker], partial=True)
            assert sorted(p.relative_to(copy).as_posix() for p in copy.glob("index/*")) == \
                sorted(files[s] for s in shards)  # its own shards, no other
            assert not list(copy.glob("store.zarr/embeddings/c/**/*"))
            assert not list(copy.glob("store.zarr/chunks/tokens/c/**/*"))


def test_build_db_on_dask_with_no_shared_filesystem_equals_a_local_build(s3_server, tiny_bert, small_jsonl,
                                                                         local_build, tmp_path):
    """Client and workers each with their own cache: the workers fetch their corpus pieces, token chunks
    and embedding blocks from the store and upload what they make; the DB equals the local build."""
    corpus_url = _upload(small_jsonl, "corpora/small/docs.jsonl")
    url = f"s3://{BUCKET}/dbs/built-on-dask"
    client_cache = tmp_path / "client"
    with _workers_with_own_caches(tmp_path) as (client, caches):
        with local_db(url, client_cache, write="test build") as path:
            build_db(local_inputs([corpus_url], client_cache), path, dask=client, **build_options(tiny_bert))
    reader = fetch_db(url, tmp_path / "reader")
    local, remote = _arrays(local_build), _arrays(reader)
    for name in ARRAYS:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)
    a, b = open_db(local_build).manifest, open_db(reader).manifest
    assert [s["sha256"] for s in a["index"]["shards"]] == [s["sha256"] for s in b["index"]["shards"]]
    assert zarr.open_group(str(reader / "store.zarr"), mode="r")["files/path"][:].tolist() == [corpus_url]
    # what each worker holds: a partial copy with its own blocks and shards; together, every one of them
    shards = {s["file"] for s in b["index"]["shards"]}
    blocks = {f.relative_to(reader).as_posix() for f in reader.glob("store.zarr/embeddings/c/*/*")}
    held_shards, held_blocks, fetched_corpus = set(), set(), []
    for cache in caches.values():
        assert not mirror_path(url, cache).exists()  # no full mirror on a worker
        copy = mirror_path(url, cache, partial=True)
        held_shards |= {p.relative_to(copy).as_posix() for p in copy.glob("index/*")}
        held_blocks |= {p.relative_to(copy).as_posix() for p in copy.glob("store.zarr/embeddings/c/*/*")}
        fetched_corpus.append(mirror_path(corpus_url, cache).is_file())
    assert held_shards == shards and held_blocks == blocks and len(blocks) > 2
    assert any(fetched_corpus)  # the worker that chunked the (one-piece) corpus fetched it itself


# -- issue 35: the cache is checked against the store, readers and a writer share one cache ---------------


def _copy_in_store(name: str) -> str:
    _fs().copy(f"{BUCKET}/dbs/small", f"{BUCKET}/dbs/{name}", recursive=True)
    return f"s3://{BUCKET}/dbs/{name}"


def _flip_a_byte(key: str) -> None:
    data = bytearray(_fs().cat_file(key))
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    _fs().pipe_file(key, bytes(data))


def test_a_store_object_changed_at_the_same_size_is_fetched_again_and_so_is_its_repair(s3_db, tmp_path, cli):
    url = _copy_in_store("flipped")
    warm, cold = str(tmp_path / "warm"), str(tmp_path / "cold")
    assert cli("verify", url, "--cache-dir", warm).exit_code == 0
    key = sorted(_fs().find(f"{BUCKET}/dbs/flipped/store.zarr/chunks/tokens/c"))[0]
    original = _fs().cat_file(key)
    _flip_a_byte(key)
    for cache in (warm, cold):  # the warm cache holds the old bytes at the same size: it must not trust them
        damaged = cli("verify", url, "--cache-dir", cache)
        assert damaged.exit_code == 1, damaged.output
        assert f"damaged: {url}/store.zarr/chunks/tokens/c/" in damaged.stderr  # the URL, not the cache path
        assert cache not in damaged.output
    _fs().pipe_file(key, original)  # repaired: the cache that fetched the damaged copy fetches it again
    for cache in (warm, cold):
        assert cli("verify", url, "--cache-dir", cache).exit_code == 0
    # a cached file changed here (same size) is not trusted either
    cached = mirror_path(url, warm) / key.split("/dbs/flipped/", 1)[1]
    data = bytearray(cached.read_bytes())
    data[0] ^= 0xFF
    cached.write_bytes(bytes(data))
    assert cli("verify", url, "--cache-dir", warm).exit_code == 0
    assert cached.read_bytes() == original


def test_a_location_without_a_manifest_is_refused_before_anything_is_copied(s3_db, tmp_path, retro_proc):
    cache = tmp_path / "cache"
    for url in (f"s3://{BUCKET}", f"s3://{BUCKET}/dbs"):  # a bucket full of objects, a prefix of DBs
        result = retro_proc("info", url, "--cache-dir", cache)
        assert result.exit_code == 2 and result.error_lines == [
            f"error: {url}: not a retro DB (no manifest.json in the store); build one with `retro chunk`"]
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_compact_out_to_a_bare_bucket_is_one_line_and_writes_nothing(s3_db, tmp_path, retro_proc):
    before = _fs().find(BUCKET)
    result = retro_proc("compact", s3_db, "--out", f"s3://{BUCKET}", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.error_lines == [f"error: s3://{BUCKET}: a DB on object storage is written under a name inside "
                                  f"the bucket (s3://{BUCKET}/NAME), not as the bucket itself"]
    _fs().invalidate_cache()
    assert _fs().find(BUCKET) == before


def test_every_spelling_of_a_db_url_takes_one_writer_lock(s3_db, tmp_path, retro_proc):
    url = _copy_in_store("spelled")
    with local_db(f"s3://{BUCKET}//dbs/spelled/", tmp_path / "a", write="first") as path:
        assert path == mirror_path(url, tmp_path / "a") and (path / "manifest.json").is_file()
        assert _fs().exists(f"{BUCKET}/dbs/.spelled.lock")
        second = retro_proc("remove", url, "--doc", "0", "--cache-dir", tmp_path / "b")
        assert second.exit_code == 2 and len(second.error_lines) == 1, second.output
        assert "another writer holds the DB (first" in second.output
    dotted = retro_proc("remove", f"s3://{BUCKET}/dbs/x/../spelled", "--doc", "0", "--cache-dir", tmp_path / "b")
    assert dotted.exit_code == 2 and dotted.error_lines == [
        f"error: s3://{BUCKET}/dbs/x/../spelled: not a DB location (empty, or with . or .. in its path)"]
    assert open_db(fetch_db(url, tmp_path / "c")).manifest.get("version", 1) == 1  # nothing was removed


def test_a_reader_sharing_the_cache_leaves_a_writers_uncommitted_segment_alone(s3_db, make_corpus, tmp_path,
                                                                               retro_proc):
    from retrocli.add import PAUSE_ENV

    url = _copy_in_store("shared")
    cache = tmp_path / "cache"
    new = make_corpus({"new.txt": "a document added while readers share the cache " * 40}) / "new.txt"
    marker = tmp_path / "paused"
    args = ["add", url, str(new), "--cache-dir", str(cache)]
    writer = subprocess.Popen([sys.executable, "-m", "retrocli", *args],
                              env={**os.environ, PAUSE_ENV: f"embed:{marker}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():  # paused with the new segment chunked here, not yet in the store
            assert writer.poll() is None, writer.stderr.read().decode()
            assert time.time() < deadline, "the add never reached its pause point"
            time.sleep(0.05)
        segment = mirror_path(url, cache) / "segments" / "00002"
        staged = sorted(p for p in segment.rglob("*") if p.is_file())
        assert staged and not _fs().exists(f"{BUCKET}/dbs/shared/segments")
        info = retro_proc("info", url, "--cache-dir", cache, "--json")
        assert info.exit_code == 0, info.output
        assert json.loads(info.stdout)["version"] == 1  # the committed version
        assert retro_proc("verify", url, "--cache-dir", cache).exit_code == 0
        assert sorted(p for p in segment.rglob("*") if p.is_file()) == staged  # nothing of the writer's deleted
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
    resumed = retro_proc(*args)  # resumes the segment it staged; the dead writer's lock is taken over
    assert resumed.exit_code == 0, resumed.output
    assert f"→ {url} version 2" in resumed.stdout and str(cache) not in resumed.stdout  # never `s3:/…`
    assert open_db(fetch_db(url, tmp_path / "fresh")).manifest["version"] == 2


def test_an_upper_case_scheme_is_a_url():
    # probe item L2: `S3://bkt/db3` (typer makes it `S3:/bkt/db3`) was taken for a local path
    assert as_location(Path("S3://bkt/db3")) == "s3://bkt/db3"
    assert as_location("S3://bkt/db3") == "s3://bkt/db3" and as_location("FILE:///tmp/x") == "/tmp/x"


def test_a_dead_writers_store_lock_is_taken_over_with_one_warning_naming_the_url(s3_db, tmp_path, retro_proc):
    # probe item L3: after a kill -9 the store's lock was taken over silently from another cache, and from the
    # same cache the local lock's warning named the cache path
    from retrocli.lock import lock_path

    url = _copy_in_store("dead-writer")
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "command": "retro add", "since": 0}
    for cache in ("same", "other"):
        _fs().pipe_file(f"{BUCKET}/dbs/.dead-writer.lock", json.dumps(holder).encode())
        local = lock_path(mirror_path(url, tmp_path / cache))
        local.parent.mkdir(parents=True, exist_ok=True)
        if cache == "same":
            local.write_text(json.dumps({**holder, "started": 0}))
        result = retro_proc("remove", url, "--doc", "0", "--cache-dir", tmp_path / cache)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == [f"warning: {url}: took over the lock of retro add (pid {dead.pid}), which is no "
                            "longer running"], result.stderr


def test_missing_credentials_are_one_line(tmp_path):
    # no credentials anywhere and no instance-metadata lookup: botocore refuses at once, without a network call
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_ENDPOINT_URL="http://127.0.0.1:9", COLUMNS="200")
    proc = subprocess.run([str(RETRO_BIN), "info", "s3://bkt/x", "--cache-dir", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: object storage: Unable to locate credentials"), proc.stderr


def test_an_ivfpq_index_on_s3_is_rebuilt_and_searched_like_a_local_one(s3_server, local_build, tmp_path, cli):
    """`retro index URL --kind ivfpq --overwrite`: the trained quantisers and the shards go up with the
    manifest; a fresh cache finds the same re-ranked neighbours as the same index built locally."""
    url = f"s3://{BUCKET}/dbs/ivfpq"
    with local_db(url, tmp_path / "writer", write="test copy") as path:
        shutil.copytree(local_build, path, dirs_exist_ok=True)
    args = ["--kind", "ivfpq", "--nlist", "4", "--pq-bytes", "16", "--rerank", "20", "--overwrite"]
    built = cli("index", url, *args, "--cache-dir", str(tmp_path / "indexer"))
    assert built.exit_code == 0, built.output
    local = tmp_path / "local"
    shutil.copytree(local_build, local)
    assert cli("index", str(local), *args).exit_code == 0
    query = ["--query", "a question about databases", "--k", "3", "--json"]
    remote = cli("neighbors", url, *query, "--cache-dir", str(tmp_path / "reader"))
    here = cli("neighbors", str(local), *query)
    assert remote.exit_code == 0, remote.output
    ids = lambda out: [n["id"] for n in json.loads(out)["chunks"][0]["neighbors"]]  # noqa: E731
    assert ids(remote.stdout) == ids(here.stdout)
    assert _fs().exists(f"{BUCKET}/dbs/ivfpq/index/trained.faiss")
    assert cli("verify", url, "--cache-dir", str(tmp_path / "reader")).exit_code == 0
