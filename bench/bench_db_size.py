"""Does the gain from retrieval grow with the DB? The bundled model evaluated on the held-out pages against
DBs of growing size: 1/8, 1/4, 1/2 and all of the training DB, then the training DB plus a retrieval-only
extension corpus. The anchor in each row is the same model without retrieval, in the same run.

    .venv/bin/python bench/bench_db_size.py --db bench-out/full --test examples/data/heldout.jsonl \\
        --extension examples/data/extension.jsonl --work bench-out/sizes --plot docs/db_size_trend.png

The fractions are nested subsets of the training DB's documents (kept when a hash of the document's id
falls below the fraction), written by `retro remove` + `retro compact`, so nothing is re-embedded. The
extended DB is a copy of the training DB with the extension added (`retro add`: only the new documents are
embedded). Held-out pages are in no DB, and every eval excludes the DB documents that near-duplicate a
held-out page (`--exclude-near-duplicates`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

FRACTIONS = (8, 4, 2)  # 1/8, 1/4, 1/2 of the training DB's documents


def keep_fraction(doc_key: str, denominator: int) -> bool:
    return int(hashlib.sha256(doc_key.encode("utf-8")).hexdigest(), 16) % 8 < 8 // denominator


def evaluate_row(args, work: Path, name: str, path: Path) -> dict:
    from retrocli.db import open_db
    from retrocli.eval import evaluate

    db = open_db(path)
    started = time.perf_counter()
    result = evaluate(
        path, [args.test], args.model, exclude_near_duplicates=True, work_dir=work / f"eval-{path.name}",
    )
    at = next(p for p in result["curve"] if p["alpha"] == 0.125)
    row = {
        "db": name, "documents": db.num_live_docs, "chunks": db.num_chunks,
        "tokens": int(db.manifest["counts"]["tokens"]),
        "bpb_retrieval": result["bpb_retrieval"], "bpb_no_retrieval": result["bpb_no_retrieval"],
        "gain": result["retrieval_gain"],
        "bpb_alpha": at["bpb"], "bpb_alpha_no_retrieval": at["bpb_no_retrieval"],
        "gain_alpha": 1 - at["bpb"] / at["bpb_no_retrieval"], "alpha_chunks": at["chunks"],
        "excluded": result["excluded_near_duplicates"], "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="The training DB (built and indexed)")
    parser.add_argument("--test", required=True, help="Held-out pages (JSONL)")
    parser.add_argument("--extension", default=None, help="Retrieval-only corpus added beyond the training DB")
    parser.add_argument("--work", required=True, help="Where the smaller and larger DBs are written (reused)")
    parser.add_argument("--model", default=None, help="Model directory (default: the bundled model)")
    parser.add_argument("--plot", default=None, help="Write a PNG of the gain against DB tokens here")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from retrocli.add import add_documents
    from retrocli.compact import compact_db
    from retrocli.db import open_db
    from retrocli.remove import remove_documents

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    full = open_db(args.db)
    dbs: list[tuple[str, Path]] = []
    # nested fractions: remove more documents from one scratch copy, compacting after each step
    scratch = work / "scratch"
    for denominator in sorted(FRACTIONS):
        target = work / f"train-1of{denominator}"
        if not (target / "manifest.json").exists():
            if not scratch.exists():
                shutil.copytree(full.path, scratch)
            gone = open_db(scratch).removed_docs
            drop = [d for d in range(full.num_docs)
                    if not keep_fraction(full.external_id(d) or str(d), denominator) and d not in gone]
            if drop:
                remove_documents(scratch, docs=drop)
            compact_db(scratch, target, overwrite=True)
        dbs.append((f"1/{denominator} of train", target))
    shutil.rmtree(scratch, ignore_errors=True)
    dbs.sort(key=lambda item: open_db(item[1]).num_docs)
    dbs.append(("train", full.path))
    rows = [evaluate_row(args, work, name, path) for name, path in dbs]
    if args.extension:  # last: the only step that embeds (only the added documents)
        extended = work / "train+extension"
        if not (extended / "manifest.json").exists():
            shutil.rmtree(extended, ignore_errors=True)
            shutil.copytree(full.path, extended)
        if open_db(extended).version == 1:
            started = time.perf_counter()
            add_documents(extended, [args.extension])  # resumes an add that was interrupted
            print(f"extension added in {time.perf_counter() - started:.0f} s", flush=True)
        rows.append(evaluate_row(args, work, "train + extension", extended))

    print(f"\nheld-out: {args.test}; model: {args.model or 'bundled'}; anchor: the same model without retrieval")
    print(f"{'DB':<20} {'tokens':>12} {'bpb retr.':>10} {'bpb none':>9} {'gain':>7} "
          f"{'bpb(α) retr.':>13} {'bpb(α) none':>12} {'gain(α)':>8}")
    for row in rows:
        print(f"{row['db']:<20} {row['tokens']:>12,} {row['bpb_retrieval']:>10.4f} {row['bpb_no_retrieval']:>9.4f} "
              f"{100 * row['gain']:>6.2f}% {row['bpb_alpha']:>13.4f} {row['bpb_alpha_no_retrieval']:>12.4f} "
              f"{100 * row['gain_alpha']:>7.2f}%")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        tokens = [row["tokens"] for row in rows]
        ax.plot(tokens, [100 * row["gain"] for row in rows], "o-", label="all held-out chunks")
        ax.plot(tokens, [100 * row["gain_alpha"] for row in rows], "s--", label="chunks with r(C) ≤ 0.125")
        for row in rows:
            ax.annotate(row["db"], (row["tokens"], 100 * row["gain"]), textcoords="offset points", xytext=(4, 6),
                        fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("DB tokens")
        ax.set_ylabel("bpb gain from retrieval (%)")
        ax.set_title("Bundled model on the held-out pages: gain against DB size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
