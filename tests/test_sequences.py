"""Model inputs from a DB: chunk rows with padding, [N, F] neighbour rows, bytes per token."""

import numpy as np

from retrocli.db import open_db
from retrocli.sequences import chunk_rows, neighbor_rows, pad_id, token_byte_lengths


def test_chunk_rows_pad_short_chunks_and_mark_real_tokens(tiny_db):
    db = open_db(tiny_db)
    pad = pad_id(db)
    tokens, real = chunk_rows(db, 0, db.num_chunks, pad)
    assert tokens.shape == (db.num_chunks, db.chunk_size)
    assert (real.sum(axis=1) == db.chunk_length).all()
    assert (tokens[~real] == pad).all()
    short = int(np.argmin(db.chunk_length))
    assert db.chunk_length[short] < db.chunk_size  # the DB has a short last chunk to check
    assert (tokens[short, : db.chunk_length[short]] == db.chunk_tokens(short)).all()


def test_neighbor_rows_are_the_chunk_and_its_continuation(tiny_db):
    db = open_db(tiny_db)
    pad, m = -7, db.chunk_size
    doc = db.doc_chunks(2)
    first, last = doc.start, doc.stop - 1
    rows = neighbor_rows(db, np.array([[first, last, -1]]), pad)
    assert rows.shape == (1, 3, 2 * m)
    expected = np.concatenate([db.chunk_tokens(first), db.chunk_tokens(first + 1)])
    assert (rows[0, 0, : len(expected)] == expected).all() and (rows[0, 0, len(expected):] == pad).all()
    # a document's last chunk has no continuation F: the rest is padding
    n = len(db.chunk_tokens(last))
    assert (rows[0, 1, :n] == db.chunk_tokens(last)).all() and (rows[0, 1, n:] == pad).all()
    assert (rows[0, 2] == pad).all()  # a missing neighbour is all padding
    tokens, lengths = db.tokens_block(0, db.num_chunks)
    assert (neighbor_rows(db, np.array([[first, last, -1]]), pad, tokens, lengths) == rows).all()


def test_token_byte_lengths_count_the_utf8_bytes_of_the_text(tiny_db):
    db = open_db(tiny_db)
    lengths = token_byte_lengths(db.tokenizer.json)
    text = "Größe: 10 µm — naïve café 🙂 done"
    ids = db.tokenizer.encode_batch([text])[0]
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert token_byte_lengths('{"decoder": {"type": "WordPiece"}, "model": {"vocab": {}}}') is None


def test_stale_neighbor_ids_give_each_chunk_the_previous_chunk_s_within_its_document():
    from retrocli.sequences import stale_neighbor_ids

    ids = np.array([[10, 11], [20, 21], [30, 31], [40, 41]])
    chunk_doc = np.array([0, 0, 0, 1])
    stale = stale_neighbor_ids(ids, chunk_doc)
    assert stale.tolist() == [[-1, -1], [10, 11], [20, 21], [-1, -1]]  # a document's first chunk gets none
