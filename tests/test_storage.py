"""DBs on object storage, against a real S3-compatible server (moto's standalone server, started here on
127.0.0.1): build-db to s3://, read and query it through a fresh cache, resume a build killed with -9,
one writer at a time, and a damaged cached shard fetched again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from retrocli.build_db import build_db
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.index import IndexOptions
from retrocli.storage import Mirror, as_location, fetch_db, local_db, mirror_path

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


BUILD = {"precision": "fp32", "threads": 1, "block_size": 16, "index_options": IndexOptions(shard_size=40, threads=1)}


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, tiny_bert, small_jsonl):
    return build_db([small_jsonl], tmp_path_factory.mktemp("local") / "db", embedder=tiny_bert, **BUILD).path


@pytest.fixture(scope="module")
def s3_db(s3_server, tmp_path_factory, tiny_bert, small_jsonl):
    url = f"s3://{BUCKET}/dbs/small"
    with local_db(url, tmp_path_factory.mktemp("writer-cache"), write="test build") as path:
        build_db([small_jsonl], path, embedder=tiny_bert, **BUILD)
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
