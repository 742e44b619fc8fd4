"""What does the per-window exclusion cost the copy-head fine-tune? Copy signal under three exclusion rules.

By default `retro train` gives each chunk of a training window the nearest neighbours from no document of its
window (a window spanning documents A and B must not read B's text, which comes later, through A's neighbours).
Looser rules would keep more near-duplicates, and near-duplicates are what teach copying. For the windows
`--retrieval-focus` draws (the top 10 % by next-chunk overlap), this measures the mean r(C) of every chunk
against the [N, F] retrieved for the chunk before it, under:
  - own document: exclude only the chunk's own document (the anchor);
  - later documents: also exclude the documents of the window's later chunks (the least that still keeps
    the window's future text out of its neighbours; `retro train --window-exclusion later`);
  - whole window: exclude every document of the window (`retro train`'s default, `--window-exclusion all`).
Windows are taken without overlap, so every chunk counts once.

    .venv/bin/python bench/bench_window_exclusion.py --db DB --neighbors DB-NEIGHBORS [--k 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--neighbors", required=True, help="`retro neighbors DB --input DB --exclude-same-doc`")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from retrocli.db import open_db
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.overlap import compute_overlap
    from retrocli.train import TrainingData

    db = open_db(args.db)
    ids = open_neighbors(args.neighbors).ids

    def data(rule: str, focus: float) -> TrainingData:
        return TrainingData(db, ids, args.seq_len, args.k, set(db.removed_docs), retrieval_focus=focus,
                            window_exclusion=rule)

    windows = data("all", 1.0)  # the focus windows are scored once, here
    length = windows.chunks
    starts = []
    for s in np.sort(windows.focus_starts):
        if not starts or s >= starts[-1] + length:
            starts.append(s)
    rows = np.asarray(starts)[:, None] + np.arange(length)[None, :]  # [W, L], every chunk at most once
    doc = db.chunk_doc
    picked = {
        # a window of one chunk bans only that chunk's own document
        "own document": windows.window_neighbors(rows.reshape(-1, 1)).reshape(*rows.shape, args.k),
        "later documents": data("later", 0.0).window_neighbors(rows),
        "whole window": windows.window_neighbors(rows),
    }
    spans = (doc[rows] != doc[rows][:, :1]).any(1)
    results = []
    for name, neighbours in picked.items():
        # chunk c is scored against the neighbours of chunk c-1 of its window and document
        per_chunk = np.full((db.num_chunks, args.k), -1, dtype=np.int64)
        per_chunk[rows[:, 1:]] = neighbours[:, :-1]
        r = compute_overlap(db, db, per_chunk).r[rows[:, 1:]]
        r = np.where(doc[rows[:, 1:]] == doc[rows[:, :-1]], r, 0.0)
        changed = (neighbours != picked["own document"]).any(-1).mean()
        results.append({"rule": name, "mean_r": float(r.mean()), "mean_r_multi_doc": float(r[spans].mean()),
                        "mean_r_single_doc": float(r[~spans].mean()), "neighbours_changed": float(changed)})
    anchor = results[0]["mean_r"]
    for res in results:
        res["ratio_to_own_document"] = res["mean_r"] / anchor
    report = {"windows": len(starts), "windows_spanning_documents": float(spans.mean()), "k": args.k,
              "rules": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{len(starts):,} focus windows without overlap, {100 * spans.mean():.0f} % spanning two or more documents, "
          f"k = {args.k}")
    print(f"{'rule':<17} {'mean r':>8} {'multi-doc':>10} {'single-doc':>11} {'chunks changed':>15} {'vs own doc':>11}")
    for res in results:
        print(f"{res['rule']:<17} {res['mean_r']:8.4f} {res['mean_r_multi_doc']:10.4f} "
              f"{res['mean_r_single_doc']:11.4f} {100 * res['neighbours_changed']:14.1f}% "
              f"{res['ratio_to_own_document']:11.3f}")


if __name__ == "__main__":
    main()
