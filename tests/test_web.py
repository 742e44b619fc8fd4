"""`retro serve`'s page and the routes it reads, against a real server on 127.0.0.1 (no browser here; see
test_web_browser.py): the page is self-contained under a strict policy, documents come from the DB only,
generation streams as server-sent events and equals `retro generate`, copied spans are credited only to
neighbours the model could read, leakage reports run on named or uploaded test sets, bad requests are one
line."""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.request

import pytest
from helpers import call, serving, tree_snapshot

from retrocli.db import open_db

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

HOSTILE = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"


@pytest.fixture(scope="module")
def web(tiny_db, planted, tmp_path_factory):
    before = tree_snapshot(tiny_db)
    log = tmp_path_factory.mktemp("web") / "stderr.log"
    with serving(tiny_db, log, "--test-set", f"planted={planted}") as (url, port):
        yield url, port
    assert tree_snapshot(tiny_db) == before  # the page, generation and leakage never changed the DB


def _get(url: str, route: str, headers: dict | None = None):
    request = urllib.request.Request(url + route, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _prompt(db, doc: int, tokens: int = 100) -> str:
    """The first `tokens` tokens of a DB document: retro-6m continues them by copying the retrieved F."""
    ids = [int(t) for c in db.doc_chunks(doc) for t in db.chunk_tokens(c)]
    return db.tokenizer.decode(ids[:tokens])


def test_the_page_is_self_contained_under_a_strict_policy(web):
    url, _ = web
    status, headers, body = _get(url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe" not in policy
    assert headers["x-content-type-options"] == "nosniff"
    page = body.decode()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from another site: works offline
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", page))  # no inline script
    assert not re.search(r"\s(style|on[a-z]+)=", page)  # no inline style or event handler
    for name, kind in (("page.js", "javascript"), ("page.css", "css")):
        status, headers, body = _get(url, f"/static/{name}")
        assert status == 200 and kind in headers["content-type"] and body
    script = _get(url, "/static/page.js")[2].decode()
    assert "innerHTML" not in script and "eval(" not in script  # corpus text only ever goes in as text
    for bad in ("/static/nope.js", "/static/..%2Fweb.py", "/static/index.html"):
        status, _, body = _get(url, bad)
        assert status == 404 and "\n" not in json.loads(body)["error"]


def test_info_names_the_model_and_the_test_sets(web):
    url, _ = web
    status, info = call(url, "/info")
    assert status == 200
    assert info["model"]["name"] == "retro-6m" and info["model"]["num_neighbors"] >= 1
    assert info["test_sets"] == ["planted"] and info["model_note"] is None
    assert "/" not in info["model"]["name"]  # a name, never the server's path


def test_a_document_is_served_whole_from_the_db(web, tiny_db):
    url, _ = web
    db = open_db(tiny_db)
    status, answer = call(url, "/documents/1")
    assert status == 200
    assert answer["text"] == db.document_text(1) and answer["source"] == db.source(1)
    assert [c["id"] for c in answer["chunks"]] == list(db.doc_chunks(1))
    assert answer["version"] == db.version
    for bad in (str(db.num_docs), "-1", "abc", "1.0", "..%2F..%2Fetc%2Fpasswd"):
        status, answer = call(url, f"/documents/{bad}")
        assert status == 404 and "\n" not in answer["error"], bad


def test_a_removed_document_is_not_served(tiny_db_copy, tmp_path):
    from retrocli.remove import remove_documents

    with serving(tiny_db_copy, tmp_path / "log", "--no-model") as (url, _):
        assert call(url, "/documents/2")[0] == 200
        remove_documents(tiny_db_copy, docs=[2])
        status, answer = call(url, "/documents/2")
        assert status == 404 and answer["error"] == "document 2 was removed from the DB" and answer["version"] == 2


def test_generate_answers_as_retro_generate_and_credits_only_readable_neighbours(web, tiny_db, cli):
    url, _ = web
    db = open_db(tiny_db)
    prompt = _prompt(db, 1)
    status, answer = call(url, "/generate", {"prompt": prompt, "max_new_tokens": 60, "temperature": 0})
    assert status == 200, answer
    by_cli = cli("generate", "--db", tiny_db, "--prompt", prompt, "--max-new-tokens", "60", "--temperature", "0",
                 "--json")
    assert by_cli.exit_code == 0, by_cli.output
    local = json.loads(by_cli.stdout)
    assert answer["text"] == local["text"]
    assert [r["neighbors"] for r in answer["retrievals"]] == [r["neighbors"] for r in local["retrievals"]]
    assert answer["copies"], "retro-6m continues a DB document by copying the neighbour's continuation"
    m = db.chunk_size
    by_chunk = {r["chunk"]: r for r in answer["retrievals"]}
    for span in answer["copies"]:
        assert (span["chunk"] + 1) * m <= answer["prompt_tokens"] + span["start"]  # CCA: it could read them
        assert span["end"] - span["start"] >= 4
        assert answer["text"][span["start_char"]:span["end_char"]] == span["text"]
        neighbor = by_chunk[span["chunk"]]["neighbors"][span["rank"]]
        assert neighbor["id"] == span["neighbor_id"] and neighbor["doc"] == span["doc"]
        assert span["text"].strip() in neighbor["text"] + (neighbor["continuation"] or "")


def _events(url: str, body: dict, stop_after: str | None = None) -> tuple[list[tuple[str, dict]], dict]:
    """POST /generate asking for server-sent events: [(event, data)] as they arrive, and the headers."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/generate", json.dumps(body),
                 {"Content-Type": "application/json", "Accept": "text/event-stream"})
    response = conn.getresponse()
    headers, events, block = {k.lower(): v for k, v in response.getheaders()}, [], []
    try:
        while True:
            line = response.readline().decode()
            if not line:
                break
            if line.strip():
                block.append(line.strip())
                continue
            name = next(b[7:] for b in block if b.startswith("event: "))
            events.append((name, json.loads(next(b[6:] for b in block if b.startswith("data: ")))))
            block = []
            if name == stop_after:
                break
    finally:
        conn.close()
    return events, headers


def test_generation_streams_text_and_each_retrieval_as_it_happens(web, tiny_db):
    url, _ = web
    db = open_db(tiny_db)
    prompt = _prompt(db, 1)
    events, headers = _events(url, {"prompt": prompt, "max_new_tokens": 80, "temperature": 0})
    assert headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and names.count("text") > 10
    first_retrieval_after_text = names.index("retrieval", names.index("text"))
    assert "text" in names[first_retrieval_after_text + 1 : -1]  # retrievals arrive between pieces of text
    done = events[-1][1]
    assert "".join(data["text"] for name, data in events if name == "text") == done["text"]
    assert [data["chunk"] for name, data in events if name == "retrieval"] == list(range(names.count("retrieval")))
    status, answer = call(url, "/generate", {"prompt": prompt, "max_new_tokens": 80, "temperature": 0})
    assert answer["text"] == done["text"] and answer["copies"] == done["copies"]


def test_a_client_that_leaves_stops_its_generation(web, tiny_db):
    url, _ = web
    events, _ = _events(url, {"prompt": "The import statement", "max_new_tokens": 1024, "temperature": 0},
                        stop_after="text")
    assert events[-1][0] == "text"
    started = time.time()  # 1,024 tokens take ~30 s on 2 cores: the next request must not wait for them
    status, answer = call(url, "/generate", {"prompt": "The import statement", "max_new_tokens": 4})
    assert status == 200 and answer["tokens"] == 4
    assert time.time() - started < 15


@pytest.mark.parametrize("body,words", [
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"prompt": "hi", "top_p": 2}, "'top_p' must be a number from 0 to 1"),
    ({"prompt": "hi", "temperature": -1}, "'temperature' must be a number ≥ 0"),
    ({"prompt": "hi", "max_new_tokens": 5000}, "'max_new_tokens' must be an integer from 1 to 1024"),
    ({"prompt": "hi", "k": 0}, "'k' must be an integer from 1"),
    ({"prompt": "hi", "seed": 1.5}, "'seed' must be an integer"),
    ({"prompt": "hi", "retrieval": "yes"}, "'retrieval' must be true or false"),
    ({"prompt": "hi", "temprature": 1}, "unknown field 'temprature'"),
    ([1, 2], "the body must be a JSON object"),
])
def test_bad_generate_requests_get_one_line(web, body, words):
    url, _ = web
    status, answer = call(url, "/generate", body)
    assert status == 400 and words in answer["error"] and "\n" not in answer["error"]


def test_work_cannot_be_started_by_another_site(web):
    """A cross-site form or CORS-simple request cannot send application/json; a DNS-rebinding page arrives
    with its own Host name."""
    url, _ = web
    for route in ("/generate", "/leakage"):
        request = urllib.request.Request(url + route, data=b'{"prompt": "hi"}', method="POST",
                                         headers={"Content-Type": "text/plain; charset=json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 415
    status, _, _ = _get(url, "/info", {"Host": "attacker.example"})
    assert status == 400


def test_leakage_of_a_named_test_set_reuses_the_html_report(web, tiny_db):
    url, _ = web
    status, answer = call(url, "/leakage", {"test_set": "planted", "k": 4})
    assert status == 200, answer
    report = answer["report"]
    assert report["num_test_docs"] == 3 and report["leaking_chunks"] > 0
    assert report["test_inputs"] == ["planted"] and report["db"] == open_db(tiny_db).path.name
    status, headers, html = _get(url, answer["html"])
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "sandbox" in headers["content-security-policy"] and "frame-ancestors 'self'" in headers[
        "content-security-policy"]
    assert b"Test-set leakage report" in html and b"<script" not in html


def test_leakage_of_an_upload_keeps_its_text_inert(web, tiny_db):
    url, _ = web
    db = open_db(tiny_db)
    content = json.dumps({"text": db.document_text(4) + " " + HOSTILE}) + "\n"
    status, answer = call(url, "/leakage", {"upload": {"name": "../../etc/evil<b>.jsonl", "content": content},
                                            "k": 2, "examples": 3})
    assert status == 200, answer
    assert answer["report"]["test_inputs"] == ["evil_b_.jsonl"]  # a name, no path, no markup
    assert all("retro-leakage-" not in d["source"] for d in answer["report"]["documents"])
    html = _get(url, answer["html"])[2].decode()
    assert "<script>window.pwned" not in html and "<img src=x" not in html


@pytest.mark.parametrize("body,status,words", [
    ({"test_set": "nope"}, 400, "no test set named 'nope' (offered: planted)"),
    ({}, 400, "give exactly one of 'test_set' or 'upload'"),
    ({"test_set": "planted", "upload": {"name": "a.txt", "content": "x"}}, 400, "give exactly one"),
    ({"upload": {"name": "a.exe", "content": "x"}}, 400, "is not a test set file"),
    ({"upload": {"name": "a.txt", "content": "  "}}, 400, "'upload.content' is empty"),
    ({"upload": {"name": "bad.jsonl", "content": "{not json\n"}}, 400, "bad.jsonl"),
    ({"test_set": "planted", "alpha": 2}, 400, "'alpha' must be a number from 0 to 1"),
])
def test_bad_leakage_requests_get_one_line(web, body, status, words):
    url, _ = web
    got, answer = call(url, "/leakage", body)
    assert got == status and words in answer["error"] and "\n" not in answer["error"], answer
    assert "retro-leakage-" not in answer["error"]  # no temporary path of the server's


def test_an_unknown_report_is_a_404(web):
    url, _ = web
    status, _, body = _get(url, "/leakage/0123456789abcdef.html")
    assert status == 404 and "no leakage report" in json.loads(body)["error"]


def test_a_server_without_a_model_searches_but_does_not_generate(tiny_db, tmp_path):
    with serving(tiny_db, tmp_path / "log", "--no-model") as (url, _):
        status, info = call(url, "/info")
        assert info["model"] is None and "--no-model" in info["model_note"]
        status, answer = call(url, "/generate", {"prompt": "hello"})
        assert status == 501 and "no model" in answer["error"]
        assert call(url, "/neighbors", {"texts": ["hello"], "k": 1})[0] == 200


def test_serve_options_are_checked_in_one_line(tiny_db, planted, cli, tmp_path):
    for args, words in ((["--test-set", "planted"], "give NAME=FILE"),
                        (["--test-set", f"a={tmp_path / 'missing.jsonl'}"], "does not exist"),
                        (["--test-set", f"a={planted}", "--test-set", f"a={planted}"], "given twice"),
                        (["--model", "retro-6m", "--no-model"], "at most one of --model and --no-model")):
        result = cli("serve", tiny_db, "--port", "9", *args)
        assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output
