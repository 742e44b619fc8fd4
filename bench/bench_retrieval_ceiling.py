"""How much can retrieval lower held-out bpb at most, on this DB? A copy ceiling, measured per token.

A token is *copyable* when it and the `--context` tokens before it occur, in that order, inside the
[N, F] retrieved for the previous chunk: that is what chunked cross-attention can see when it predicts
the token, and it is the only kind of help that survives a small model. The ceiling is the bpb when
every copyable token costs 0 bits and every other token keeps its no-retrieval cost; the anchor, from
the same run, is the model's bpb without retrieval (and, for reference, with it).

It is a ceiling for copying runs of context + 1 tokens, not for retrieval: a model can also gain on tokens
that shorter matches predict, or that its neighbours make likelier without a copy. So each k also splits the
model's own gain (fed its own k) between the copyable tokens and the rest, as shares of the no-retrieval bits.

    .venv/bin/python bench/bench_retrieval_ceiling.py --db DB --test-neighbors NB --model MODEL [--k 2 10]

NB: `retro neighbors DB --input HELDOUT.jsonl --out NB --k 10` (k >= the largest --k).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def copyable(test, db, neighbor_ids: np.ndarray, k: int, context: int, pad: int,
             db_tokens: np.ndarray, db_lengths: np.ndarray) -> np.ndarray:
    """[num_test_chunks, m] bool: token j of chunk c is copyable from the neighbours of chunk c-1."""
    from retrocli.near_duplicates import ngram_window_hashes
    from retrocli.sequences import chunk_rows, neighbor_rows

    m, n = test.chunk_size, test.num_chunks
    tokens, real = chunk_rows(test, 0, n, pad)
    neighbors = neighbor_rows(db, neighbor_ids[:, :k], pad, db_tokens, db_lengths)  # [n, k, 2m]
    out = np.zeros((n, m), dtype=bool)
    doc = test.chunk_doc
    for c in range(1, n):
        if doc[c] != doc[c - 1]:
            continue  # the first chunk of a document has no retrieval before it
        keys = np.concatenate([ngram_window_hashes(row[row != pad], context + 1) for row in neighbors[c - 1]])
        # the context may start in chunk c-1: the test text runs on across the chunk boundary
        stream = np.concatenate([tokens[c - 1][real[c - 1]], tokens[c][real[c]]])
        own = int(real[c].sum())
        hits = np.isin(ngram_window_hashes(stream, context + 1)[-own:], keys)
        out[c, own - len(hits) : own] = hits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--test-neighbors", required=True, help="batch neighbours of the held-out text")
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--context", type=int, default=4, help="tokens that must match before a copy")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--losses", default=None,
                        help="`retro eval --losses-out` of this model, DB and test set: its per-token bits and "
                        "neighbours are used instead of two forward passes here")
    parser.add_argument("--exclude-near-duplicates", action="store_true",
                        help="drop the DB documents that near-duplicate each test page, as `retro eval` does "
                        "(NB then needs more candidates than the largest --k: eval's --work-dir holds them)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from retrocli.db import open_db
    from retrocli.eval import chunk_losses
    from retrocli.model.checkpoint import load_model, resolve_model
    from retrocli.neighbor_arrays import open_neighbors, query_db_of
    from retrocli.sequences import pad_id

    db = open_db(args.db)
    nb = open_neighbors(args.test_neighbors)
    test = query_db_of(args.test_neighbors, nb)
    model_dir = resolve_model(args.model, db)
    model, _ = load_model(model_dir, db)
    ids = nb.ids
    if args.losses:  # eval's own bits and neighbours (with its near-duplicate exclusion, if it had one)
        from retrocli.eval import ChunkLosses

        with np.load(args.losses, allow_pickle=False) as saved:
            if saved["token_bits_none"].shape[0] != test.num_chunks or \
                    not np.array_equal(saved["chunk_doc"], test.chunk_doc):
                raise SystemExit(f"{args.losses}: not the losses of this test set")
            losses = ChunkLosses(saved["token_bits_retrieval"], saved["token_bits_none"], saved["bytes"])
            ids = saved["neighbor_ids"]
        if ids.shape[1] < max(args.k):
            raise SystemExit(f"{args.losses}: holds {ids.shape[1]} neighbours per chunk, fewer than --k {max(args.k)}")
    else:
        if args.exclude_near_duplicates:
            from retrocli.near_duplicates import drop_near_duplicate_neighbors, near_duplicates

            pairs, _ = near_duplicates(db, test)
            ids, _ = drop_near_duplicate_neighbors(db, test, nb.ids, pairs,
                                                   max(args.k + [model.config.num_neighbors]))
        losses = chunk_losses(model, db, test, ids)
    total_bytes = losses.bytes.sum()
    scored = losses.token_bits_none > 0  # tokens the model is scored on
    result = {
        "model": str(model_dir),
        "test_chunks": int(test.num_chunks),
        "context": args.context,
        "excluded_near_duplicates": args.exclude_near_duplicates,
        "losses": args.losses,
        "bpb_no_retrieval": float(losses.token_bits_none.sum() / total_bytes),
        "bpb_retrieval": float(losses.token_bits_retrieval.sum() / total_bytes),
        "model_k": model.config.num_neighbors,  # what the model is fed for bpb_retrieval and the gain split
        "ceilings": [],
    }
    db_tokens, db_lengths = db.tokens_block(0, db.num_chunks)  # read once for every k
    for k in args.k:
        mask = copyable(test, db, ids, k, args.context, pad_id(db), db_tokens, db_lengths) & scored
        bits = np.where(mask, 0.0, losses.token_bits_none).sum()
        ceiling = float(bits / total_bytes)
        saved = losses.token_bits_none - losses.token_bits_retrieval  # bits retrieval saved, per token
        result["ceilings"].append(
            {
                "k": k,
                "copyable_tokens": float(mask.sum() / scored.sum()),
                "copyable_bits": float(losses.token_bits_none[mask].sum() / losses.token_bits_none.sum()),
                "bpb_ceiling": ceiling,
                "max_gain": 1 - ceiling / result["bpb_no_retrieval"],
                "gain_on_copyable": float(saved[mask].sum() / losses.token_bits_none.sum()),
                "gain_elsewhere": float(saved[scored & ~mask].sum() / losses.token_bits_none.sum()),
            }
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"held-out: {test.num_chunks} chunks; model {model_dir}")
    plain, with_retrieval = result["bpb_no_retrieval"], result["bpb_retrieval"]
    print(f"anchor  bpb without retrieval {plain:.4f}, with retrieval {with_retrieval:.4f} "
          f"(gain {1 - with_retrieval / plain:+.2%})")
    for c in result["ceilings"]:
        print(f"k={c['k']:<3} copyable tokens {c['copyable_tokens']:.1%} holding {c['copyable_bits']:.1%} of the bits; "
              f"ceiling bpb {c['bpb_ceiling']:.4f} = at most {c['max_gain']:.1%} lower than without retrieval")
        print(f"      the model's gain (k={result['model_k']}): {c['gain_on_copyable']:.2%} on copyable tokens, "
              f"{c['gain_elsewhere']:.2%} elsewhere")


if __name__ == "__main__":
    main()
