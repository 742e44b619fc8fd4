"""`retro serve`, a real server on a free 127.0.0.1 port: the same neighbours as query mode, requests from
many clients batched into one call, bad requests refused in one line, the DB never touched but followed
from version to version (503 when it is gone or damaged), and `retro generate --retriever` giving the same
text as a local DB."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import call, free_port, serving, tree_snapshot

from retrocli.db import open_db
from retrocli.neighbors import query_neighbors
from retrocli.options import SamplingOptions
from retrocli.sequences import neighbor_rows, pad_id

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_db, tmp_path_factory):
    before = tree_snapshot(tiny_db)
    with serving(tiny_db, tmp_path_factory.mktemp("serve") / "stderr.log") as (url, port):
        yield url, port
    assert tree_snapshot(tiny_db) == before  # serving never changed the DB


def test_health_and_info_describe_the_db(server, tiny_db):
    url, _ = server
    db = open_db(tiny_db)
    served = {"db_id": db.manifest["db_id"], "version": db.version, "content_id": db.content_id}
    assert call(url, "/health") == (200, {"status": "ok", **served})
    status, info = call(url, "/info")
    assert status == 200 and served.items() <= info.items()
    assert info["chunks"] == db.num_chunks and info["chunk_size"] == db.chunk_size
    assert info["tokenizer_sha256"] == db.tokenizer_sha256 and info["pad_id"] == pad_id(db)


def test_neighbors_of_texts_equal_query_mode(server, tiny_db):
    url, _ = server
    db = open_db(tiny_db)
    texts = [db.document_text(3)[:900], "how do I open a file"]
    status, answer = call(url, "/neighbors", {"texts": texts, "k": 3})
    assert status == 200
    local = query_neighbors(db, texts, k=3)
    for result, chunks in zip(answer["results"], local):
        assert [c["text"] for c in result["chunks"]] == [c.text for c in chunks]
        for got, want in zip(result["chunks"], chunks):
            assert [n["id"] for n in got["neighbors"]] == [n.id for n in want.neighbors]
            np.testing.assert_allclose([n["distance"] for n in got["neighbors"]],
                                       [n.distance for n in want.neighbors], rtol=1e-5, atol=1e-6)
            assert [n["source"] for n in got["neighbors"]] == [n.source for n in want.neighbors]
            rows = neighbor_rows(db, np.array([n.id for n in want.neighbors]), pad_id(db))
            for row, nb in zip(rows, got["neighbors"]):
                tokens = nb["tokens"] + nb["continuation_tokens"]
                assert row[: len(tokens)].tolist() == tokens  # the [N, F] the model reads


def test_an_ivfpq_db_is_served_with_the_width_given_to_serve(tiny_db_copy, tmp_path):
    """`retro serve --rerank 0` searches the codes alone, as query mode with --rerank 0 does; /info says
    which width is in force; the DB keeps the one it recorded."""
    from retrocli.index import index_db, remove_index
    from retrocli.options import IndexOptions

    remove_index(tiny_db_copy)
    db = index_db(tiny_db_copy, IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16, nprobe=4, rerank=50))
    texts = [db.document_text(3)[:600]]
    with serving(tiny_db_copy, tmp_path / "stderr.log", "--no-model", "--rerank", "0") as (url, _):
        assert call(url, "/info")[1]["search"] == {"kind": "ivfpq", "ef": 128, "nprobe": 4, "rerank": 0}
        status, answer = call(url, "/neighbors", {"texts": texts, "k": 3})
    assert status == 200
    got = [n["distance"] for n in answer["results"][0]["chunks"][0]["neighbors"]]
    coded, exact = (query_neighbors(db, texts, k=3, rerank=rerank)[0][0].neighbors for rerank in (0, None))
    np.testing.assert_allclose(got, [n.distance for n in coded], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, [n.distance for n in exact], atol=1e-3)
    assert open_db(tiny_db_copy).manifest["index"]["rerank"] == 50


def test_token_ids_and_exclusions(server, tiny_db):
    url, _ = server
    db = open_db(tiny_db)
    chunk = db.chunk_tokens(int(db.doc_chunks(2).start)).tolist()
    _, by_ids = call(url, "/neighbors", {"token_ids": [chunk], "k": 2})
    _, by_text = call(url, "/neighbors", {"texts": [db.tokenizer.decode(chunk)], "k": 2})
    first = by_ids["results"][0]["chunks"][0]["neighbors"]
    assert [n["id"] for n in first] == [n["id"] for n in by_text["results"][0]["chunks"][0]["neighbors"]]
    assert first[0]["doc"] == 2 and first[0]["distance"] < 1e-4  # the chunk itself
    _, without = call(url, "/neighbors", {"token_ids": [chunk], "k": 2, "exclude_docs": [2]})
    assert all(n["doc"] != 2 for n in without["results"][0]["chunks"][0]["neighbors"])
    _, same = call(url, "/neighbors", {"token_ids": [chunk], "k": 2, "exclude_same_doc": True})
    local = query_neighbors(db, [db.tokenizer.decode(chunk)], k=2, exclude_same_doc=True)[0][0]
    assert [n["id"] for n in same["results"][0]["chunks"][0]["neighbors"]] == [n.id for n in local.neighbors]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"texts": ["a"], "token_ids": [[1]]}).encode(), "exactly one"),
    (json.dumps({"texts": ["a"], "k": 0}).encode(), "'k'"),
    (json.dumps({"texts": ["a"], "k": True}).encode(), "'k'"),
    (json.dumps({"texts": [""]}).encode(), "non-empty"),
    (json.dumps({"token_ids": [[10 ** 9]]}).encode(), "out of range"),
    (json.dumps({"token_ids": [[-1]]}).encode(), "out of range"),
    (json.dumps({"texts": ["a"], "path": "../../etc/passwd"}).encode(), "unknown field 'path'"),
    (json.dumps({"texts": ["a"], "exclude_docs": [10 ** 6]}).encode(), "out of range"),
    (json.dumps({"texts": ["a"] * 2000}).encode(), "at most"),
    # hostile JSON: each was a 500 with a traceback, or text the tokenizer cannot take
    (b'{"texts": ["\\ud800 abc"]}', "lone surrogate"),
    (b'{"\\udfff": 1}', "lone surrogate"),
    (b"[" * 100_000, "too deeply"),
    (b'{"texts": ["a"], "k": NaN}', "NaN"),
    (b'{"texts": ["a"], "texts": ["b"]}', "repeats"),
    (b'{"texts": ["\xff"]}', "UTF-8"),
])
def test_bad_requests_get_a_400_with_one_line(server, body, words):
    url, _ = server
    status, answer = call(url, "/neighbors", raw=body)
    assert status == 400 and words in answer["error"] and "\n" not in answer["error"]


def test_wrong_routes_methods_and_sizes(server):
    import http.client

    url, port = server
    assert call(url, "/neighbors", method="GET")[0] == 405
    status, answer = call(url, "/../../etc/passwd")
    assert status == 404 and "no such route" in answer["error"]
    # a body announced larger than the limit is refused before it is read
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/neighbors")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "larger than" in json.loads(response.read())["error"]
    conn.close()


def test_concurrent_requests_share_calls_and_get_their_own_answers(server, tiny_db):
    url, _ = server
    db = open_db(tiny_db)
    texts = [db.chunk_text(c) for c in range(0, min(db.num_chunks, 48), 3)]
    alone = [call(url, "/neighbors", {"texts": [t], "k": 2})[1] for t in texts]
    _, before = call(url, "/info")
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: call(url, "/neighbors", {"texts": [t], "k": 2})[1], texts))
    _, after = call(url, "/info")
    ids = lambda a: [n["id"] for c in a["results"][0]["chunks"] for n in c["neighbors"]]  # noqa: E731
    assert [ids(a) for a in together] == [ids(a) for a in alone]
    assert after["requests"] - before["requests"] == len(texts)
    assert after["batches"] - before["batches"] < len(texts)  # some requests were answered together


def test_generate_through_the_server_equals_local_retrieval(server, trained, tiny_db, cli):
    from retrocli.generate import generate

    url, _ = server
    out, _ = trained
    prompt = open_db(tiny_db).document_text(2)[:600]
    local = generate(tiny_db, prompt, out, sampling=SamplingOptions(max_new_tokens=70, temperature=0.9, seed=3))
    remote = generate(
        None, prompt, out, retriever=url, sampling=SamplingOptions(max_new_tokens=70, temperature=0.9, seed=3),
    )
    assert remote.text == local.text and remote.token_ids == local.token_ids
    assert [[n.id for n in r.neighbors] for r in remote.retrievals] == \
        [[n.id for n in r.neighbors] for r in local.retrievals]
    args = ["--model", out, "--prompt", prompt[:300], "--max-new-tokens", "8", "--temperature", "0", "--json"]
    by_cli = cli("generate", "--retriever", url, *args)
    assert by_cli.exit_code == 0, by_cli.output
    assert json.loads(by_cli.stdout)["text"] == json.loads(cli("generate", "--db", tiny_db, *args).stdout)["text"]


def test_generate_needs_exactly_one_source_and_a_live_server(trained, tiny_db, cli):
    out, _ = trained
    neither = cli("generate", "--model", out, "--prompt", "x")
    assert neither.exit_code != 0 and "exactly one of --db" in neither.stderr
    dead = cli("generate", "--retriever", f"http://127.0.0.1:{free_port()}", "--model", out, "--prompt", "x")
    assert dead.exit_code != 0 and "cannot reach the retrieval server" in dead.stderr
    assert "Traceback" not in dead.output


def test_serving_on_a_port_in_use_is_one_line(server, tiny_db, cli):
    _, port = server
    result = cli("serve", tiny_db, "--port", str(port))
    assert result.exit_code != 0 and f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output


def _first_chunk(db_path: Path, doc: int) -> list[int]:
    db = open_db(db_path)
    return db.chunk_tokens(int(db.doc_chunks(doc).start)).tolist()


def test_the_server_follows_each_committed_version_and_a_vanished_db(tiny_db, tiny_db_copy, tmp_path, retro_proc):
    db = tiny_db_copy
    chunk = _first_chunk(db, 5)
    docs = lambda answer: {n["doc"] for n in answer["results"][0]["chunks"][0]["neighbors"]}  # noqa: E731
    new_doc = "Quantum chromodynamics describes quarks and gluons; the strong force confines colour charge. " * 6
    (tmp_path / "new.jsonl").write_text(json.dumps({"text": new_doc}) + "\n")
    log = tmp_path / "stderr.log"
    with serving(db, log) as (url, _):
        status, before = call(url, "/neighbors", {"token_ids": [chunk], "k": 3})
        assert status == 200 and before["version"] == 1 and 5 in docs(before)
        assert before["content_id"] == open_db(db).content_id

        removed = retro_proc("remove", db, "--doc", "5")
        assert removed.exit_code == 0, removed.output
        status, after = call(url, "/neighbors", {"token_ids": [chunk], "k": 3})
        assert status == 200 and 5 not in docs(after)  # the next request already sees the removal
        assert after["version"] == 2 and after["content_id"] == open_db(db).content_id != before["content_id"]
        assert call(url, "/info")[1]["version"] == 2 and call(url, "/health")[1]["version"] == 2

        added = retro_proc("add", db, tmp_path / "new.jsonl")
        assert added.exit_code == 0, added.output
        grown = open_db(db)
        status, found = call(url, "/neighbors", {"token_ids": [_first_chunk(db, grown.num_docs - 1)], "k": 1})
        assert status == 200 and found["version"] == 3 and docs(found) == {grown.num_docs - 1}
        assert call(url, "/info")[1]["documents"] == grown.num_docs

        shutil.rmtree(db)
        for route, body in (("/neighbors", {"token_ids": [chunk]}), ("/health", None), ("/info", None)):
            status, gone = call(url, route, body)
            assert status == 503 and "cannot be read" in gone["error"], (route, gone)
            assert "\n" not in gone["error"] and str(tmp_path) not in gone["error"]
        assert call(url, "/health")[1]["status"] == "unavailable"

        shutil.copytree(tiny_db, db)  # a DB there again: served again
        status, back = call(url, "/neighbors", {"token_ids": [chunk], "k": 3})
        assert status == 200 and back["version"] == 1 and 5 in docs(back)
    assert "Traceback" not in log.read_text()


def test_a_damaged_db_is_a_503_without_paths_and_disconnects_log_nothing(tiny_db_copy, tmp_path):
    import http.client

    db = tiny_db_copy
    log = tmp_path / "stderr.log"
    with serving(db, log) as (url, port):
        for _ in range(3):  # clients that leave mid-body
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.putrequest("POST", "/neighbors")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", "1000")
            conn.endheaders(b'{"texts": ["half a bo')
            conn.close()
        # one byte of the token store flipped, its size unchanged: the checksum catches it on the first read
        tokens = db / "store.zarr" / "chunks" / "tokens" / "c" / "0" / "0"
        data = bytearray(tokens.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tokens.write_bytes(bytes(data))
        status, answer = call(url, "/neighbors", {"texts": ["how do I open a file"], "k": 2})
        assert status == 503 and "damaged" in answer["error"] and "\n" not in answer["error"]
        assert "/tmp" not in answer["error"] and str(tmp_path) not in answer["error"]
        for route in ("/health", "/info"):
            status, body = call(url, route)
            assert status == 503 and body["error"] == answer["error"]
    text = log.read_text()
    assert "Traceback" not in text and "ClientDisconnect" not in text


def test_serve_refuses_a_bad_thread_count_in_one_line(tiny_db, cli):
    result = cli("serve", tiny_db, "--threads", "-1")
    assert result.exit_code == 2 and result.exception is None
    assert result.error_lines == [line for line in result.output.splitlines() if line.strip()]
    assert "--threads" in result.stderr


def test_a_manifest_rewritten_in_place_with_its_old_mtime_and_size_is_a_new_stamp(tmp_path):
    # probe item L1: `cat OTHER/manifest.json > S/manifest.json; touch -r OLD S/manifest.json` kept the inode,
    # mtime and size, so the server went on answering from the old content
    from retrocli.serve import manifest_stamp

    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"version": 1}')
    before, old = manifest_stamp(tmp_path), manifest.stat()
    time.sleep(0.02)  # past a tick of the coarse clock the kernel stamps ctime with
    with open(manifest, "r+") as handle:  # in place: same inode
        handle.write('{"version": 2}')
    os.utime(manifest, ns=(old.st_atime_ns, old.st_mtime_ns))
    after = manifest.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (old.st_ino, old.st_mtime_ns, old.st_size)
    assert manifest_stamp(tmp_path) != before


def test_a_retrofit_generates_through_the_server_as_with_local_retrieval(server, tiny_db, self_neighbors, db_base,
                                                                          tmp_path):
    from retrocli.generate import generate
    from retrocli.options import TrainOptions
    from retrocli.train import train

    url, _ = server
    out = tmp_path / "retrofit"
    train(tiny_db, self_neighbors, out, TrainOptions(config="retrofit", base=str(db_base), cca_start=2, cca_every=2,
                                                     seq_len=128, batch_size=2, steps=2, warmup=1, threads=1))
    prompt = open_db(tiny_db).document_text(2)[:600]
    local = generate(tiny_db, prompt, out, sampling=SamplingOptions(max_new_tokens=70, temperature=0.9, seed=3))
    remote = generate(
        None, prompt, out, retriever=url, sampling=SamplingOptions(max_new_tokens=70, temperature=0.9, seed=3),
    )
    assert remote.token_ids == local.token_ids and remote.retrievals
    assert [[n.id for n in r.neighbors] for r in remote.retrievals] == \
        [[n.id for n in r.neighbors] for r in local.retrievals]
