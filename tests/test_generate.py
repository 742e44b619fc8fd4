"""`retro generate`: retrieval while sampling, determinism, the copy report."""

import json

import numpy as np
from helpers import tree_snapshot

from retrocli.db import open_db


def test_generate_retrieves_each_completed_chunk_and_is_deterministic(trained, tiny_db):
    from retrocli.generate import generate

    out, _ = trained
    db = open_db(tiny_db)
    prompt = db.document_text(2)[:600]
    n_prompt = len(db.tokenizer.encode_batch([prompt])[0])
    before = tree_snapshot(tiny_db)
    streamed = []
    a = generate(tiny_db, prompt, out, max_new_tokens=70, temperature=0.9, seed=3, on_text=streamed.append)
    b = generate(tiny_db, prompt, out, max_new_tokens=70, temperature=0.9, seed=3)
    c = generate(tiny_db, prompt, out, max_new_tokens=70, temperature=0.9, seed=4)
    assert a.text == b.text and "".join(streamed) == a.text
    assert a.text != c.text or len(a.text) == 0
    assert len(a.retrievals) == (n_prompt + 70) // 64
    assert a.retrievals[0].neighbors and a.retrievals[0].neighbors[0].id in db.doc_chunks(2)
    assert tree_snapshot(tiny_db) == before


def test_generate_cli_greedy_json(trained, tiny_db, cli):
    out, _ = trained
    args = ["generate", "--db", tiny_db, "--model", out, "--prompt", "Python classes", "--max-new-tokens", "8",
            "--temperature", "0", "--json"]
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]
    bad = cli("generate", "--db", tiny_db, "--model", out, "--prompt", " ")
    assert bad.exit_code == 2 and "empty" in bad.output


def test_longest_copy_finds_the_run_taken_from_a_neighbour(tiny_db):
    from retrocli.generate import Retrieval, longest_copy
    from retrocli.neighbors import neighbor_refs
    from retrocli.sequences import neighbor_rows, pad_id

    db = open_db(tiny_db)
    donor = int(db.doc_chunks(4).start)
    assert db.continuation(donor) is not None
    # 20 tokens spanning the end of the neighbour N and the start of its continuation F, between noise
    pair = np.concatenate([db.chunk_tokens(donor), db.chunk_tokens(donor + 1)])
    run = pair[len(db.chunk_tokens(donor)) - 8 :][:20].tolist()
    generated = [5, 6, 7] + run + [8, 9]
    other = int(db.doc_chunks(1).start)
    ids, pad = np.array([other, donor]), pad_id(db)
    refs = neighbor_refs(db, ids, np.array([0.1, 0.2], dtype=np.float32))
    copy = longest_copy(db.tokenizer, pad, generated, [Retrieval(0, "q", refs, neighbor_rows(db, ids, pad))])
    assert copy.tokens >= 20 and copy.neighbor_id == donor
    assert db.tokenizer.decode(run) in copy.text
    assert copy.source == db.source(4)
    assert longest_copy(db.tokenizer, pad, generated, []) is None


def test_stale_retrieval_hands_each_chunk_the_previous_chunk_s_neighbours():
    import threading

    from retrocli.generate import Retrieval, StaleRetrieval

    threads = []

    def fresh(chunk_ids):
        threads.append(threading.current_thread().name)
        return Retrieval(-1, str(chunk_ids), [])

    stale = StaleRetrieval(fresh)
    assert stale([1]) is None  # nothing retrieved yet: the next chunk reads no neighbours
    assert stale([2]).chunk_text == "[1]"
    assert stale([3]).chunk_text == "[2]"
    assert stale.finish().chunk_text == "[3]"
    assert all(name.startswith("retro-retrieval") for name in threads)  # off the decoding thread


def test_generate_with_stale_retrieval_is_deterministic_and_retrieves_every_chunk(trained, tiny_db):
    from retrocli.generate import generate

    out, _ = trained
    prompt = open_db(tiny_db).document_text(2)[:600]
    fresh = generate(tiny_db, prompt, out, max_new_tokens=70, temperature=0)
    a = generate(tiny_db, prompt, out, max_new_tokens=70, temperature=0, stale_retrieval=True)
    b = generate(tiny_db, prompt, out, max_new_tokens=70, temperature=0, stale_retrieval=True)
    assert a.text == b.text and len(a.token_ids) == 70
    assert len(a.retrievals) == len(fresh.retrievals)
    # the prompt's first chunk is the same text either way, so its neighbours are too
    assert [n.id for n in a.retrievals[0].neighbors] == [n.id for n in fresh.retrievals[0].neighbors]
