"""Leakage passes on a built DB.

1. Overlap pass (r(C)): test chunks/s of our vectorised longest-common-run over each chunk's k [N, F]
   neighbours, vs the anchor difflib.SequenceMatcher.find_longest_match per pair, on the same chunks.
   Queries are the DB's own chunks with neighbours from the index, so no embedding time is mixed in.
2. Near-duplicate pass: documents/s of our path (numpy n-gram hashes → datasketch MinHash/LSH) vs the
   anchor, a plain datasketch loop (SHA-1 of each n-gram's bytes, MinHash.update per n-gram, MinHashLSH),
   on the same DB documents and the same planted near-duplicate test documents; both verified exactly,
   and the recall of each at the threshold is printed (it must be equal).

    .venv/bin/python bench/bench_leakage.py --db DB [--test-docs 200]
"""

from __future__ import annotations

import argparse
import difflib
import time

import numpy as np


def plain_datasketch(db, test_docs: list[np.ndarray], n: int, num_perm: int, threshold: float):
    from datasketch import MinHash, MinHashLSH

    from retrocli.near_duplicates import doc_tokens

    def shingles(tokens):
        tokens = tokens.astype(np.int64)
        if len(tokens) < n:
            return {tokens.tobytes()}
        return {tokens[i : i + n].tobytes() for i in range(len(tokens) - n + 1)}

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sets = {}
    for doc in range(db.num_docs):
        sh = shingles(doc_tokens(db, doc))
        mh = MinHash(num_perm=num_perm)
        for s in sh:
            mh.update(s)
        lsh.insert(doc, mh)
        sets[doc] = sh
    found = set()
    for t, tokens in enumerate(test_docs):
        sh = shingles(tokens)
        mh = MinHash(num_perm=num_perm)
        for s in sh:
            mh.update(s)
        for doc in lsh.query(mh):
            if len(sh & sets[doc]) / len(sh | sets[doc]) >= threshold:
                found.add((doc, t))
    return found, time.perf_counter() - start


def ours(db, test_docs: list[np.ndarray], n: int, num_perm: int, threshold: float):
    from datasketch import MinHashLSH

    from retrocli.near_duplicates import doc_tokens, jaccard, minhash_of, ngram_hashes

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    tokens, lengths = db.tokens_block(0, db.num_chunks)
    hashes = {}
    for doc in range(db.num_docs):
        hashes[doc] = ngram_hashes(doc_tokens(db, doc, tokens, lengths), n)
        lsh.insert(doc, minhash_of(hashes[doc], num_perm), check_duplication=False)
    found = set()
    for t, toks in enumerate(test_docs):
        h = ngram_hashes(toks, n)
        for doc in lsh.query(minhash_of(h, num_perm)):
            if jaccard(hashes[doc], h) >= threshold:
                found.add((doc, t))
    return found, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--overlap-chunks", type=int, default=5000)
    parser.add_argument("--anchor-chunks", type=int, default=300)
    parser.add_argument("--test-docs", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from retrocli.db import load_embeddings, open_db
    from retrocli.index import ShardedIndex
    from retrocli.near_duplicates import doc_tokens
    from retrocli.overlap import NEIGHBOR_PAD, compute_overlap
    from retrocli.sequences import neighbor_rows

    db = open_db(args.db)
    rng = np.random.default_rng(args.seed)

    # 1. overlap pass
    n = min(args.overlap_chunks, db.num_chunks)
    ids, _ = ShardedIndex(db).search(load_embeddings(db, 0, n), args.k)

    class Prefix:  # the first n DB chunks viewed as a query set
        num_chunks = n
        chunk_size = db.chunk_size
        chunk_length = db.chunk_length[:n]
        chunk_doc = db.chunk_doc[:n]

        def tokens_block(self, a, b):
            return db.tokens_block(a, b)

    start = time.perf_counter()
    ov = compute_overlap(db, Prefix(), ids)
    ours_rate = n / (time.perf_counter() - start)
    a = min(args.anchor_chunks, n)
    tokens, lengths = db.tokens_block(0, db.num_chunks)
    pairs = neighbor_rows(db, ids[:a], NEIGHBOR_PAD, tokens.astype(np.int64), lengths)
    start = time.perf_counter()
    anchor_r = np.zeros(a)
    for c in range(a):
        q = db.chunk_tokens(c).tolist()
        best = 0
        for row in pairs[c]:
            t = row[row >= 0].tolist()
            best = max(best, difflib.SequenceMatcher(None, q, t, autojunk=False).find_longest_match(
                0, len(q), 0, len(t)).size)
        anchor_r[c] = best / len(q)
    anchor_rate = a / (time.perf_counter() - start)
    assert np.allclose(anchor_r, ov.r[:a]), "r(C) disagrees with difflib"
    print(f"overlap pass (k={args.k}): ours {ours_rate:,.0f} test chunks/s vs difflib per pair "
          f"{anchor_rate:,.0f} chunks/s (ratio {ours_rate / anchor_rate:.1f}); r(C) identical on {a} chunks")

    # 2. near-duplicate pass: planted near-duplicates (1 word in 100 changed) + unrelated shuffles
    docs = rng.choice(db.num_docs, size=min(args.test_docs, db.num_docs), replace=False)
    test_docs = []
    for i, d in enumerate(docs):
        toks = doc_tokens(db, int(d)).copy()
        if i % 2 == 0:
            edit = rng.random(len(toks)) < 0.002
            toks[edit] = rng.integers(0, 8000, edit.sum())
        else:
            rng.shuffle(toks)
        test_docs.append(toks)
    found_plain, t_plain = plain_datasketch(db, test_docs, 13, 128, 0.8)
    found_ours, t_ours = ours(db, test_docs, 13, 128, 0.8)
    total = db.num_docs + len(test_docs)
    truth = set()
    from retrocli.near_duplicates import jaccard, ngram_hashes
    for t, toks in enumerate(test_docs):
        d = int(docs[t])
        if jaccard(ngram_hashes(doc_tokens(db, d), 13), ngram_hashes(toks, 13)) >= 0.8:
            truth.add((d, t))
    rec = lambda found: len(found & truth) / max(1, len(truth))  # noqa: E731
    print(f"near-duplicate pass ({db.num_docs} DB docs + {len(test_docs)} test docs): ours "
          f"{total / t_ours:,.0f} docs/s vs plain datasketch {total / t_plain:,.0f} docs/s "
          f"(ratio {t_plain / t_ours:.1f}); recall at J≥0.8 of planted pairs ({len(truth)}): "
          f"ours {rec(found_ours):.3f}, plain {rec(found_plain):.3f}")


if __name__ == "__main__":
    main()
