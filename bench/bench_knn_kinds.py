"""A kNN-LM datastore on ivfpq against the exact (hnsw) one it was copied from: disk bytes (and their ratio
to the DB's), and the held-out bpb of kNN-LM and RETRO + kNN-LM. The anchor is the hnsw datastore,
evaluated in the same run.

    .venv/bin/python bench/bench_knn_kinds.py --db demo-out/db --datastore DS --test examples/subset/heldout.jsonl \
        --pq-bytes 64 96 144

Each ivfpq datastore (one per --pq-bytes) reuses the anchor's keys: its directory is copied, marked as not
yet indexed with the ivfpq options, and `build_datastore` resumes it at the index stage (which then drops the keys).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--datastore", required=True, help="a complete hnsw datastore of --db")
    parser.add_argument("--test", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--pq-bytes", type=int, nargs="+", default=[64], help="code sizes to compare")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--work", default="bench-out/knn-kinds")
    args = parser.parse_args()

    from dataclasses import asdict

    from retrocli.db import open_db
    from retrocli.eval import evaluate
    from retrocli.knn_datastore import build_datastore
    from retrocli.options import DatastoreOptions, KnnOptions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    anchor = Path(args.datastore)
    db_bytes = disk_bytes(open_db(args.db).path)
    stores, index_seconds = {"hnsw": anchor}, {}
    for pq_bytes in args.pq_bytes:
        name = f"ivfpq{pq_bytes}"
        quantised = work / name
        manifest = json.loads((anchor / "manifest.json").read_text())
        options = DatastoreOptions(**{**asdict(DatastoreOptions()), **manifest["options"]})
        options.kind, options.pq_bytes, options.nprobe = "ivfpq", pq_bytes, args.nprobe
        done = (quantised / "manifest.json").exists() and json.loads(
            (quantised / "manifest.json").read_text())["stages"]["index"]["status"] == "complete"
        if not done:
            shutil.rmtree(quantised, ignore_errors=True)
            shutil.copytree(anchor, quantised, ignore=shutil.ignore_patterns("index", "*.lock"))
            manifest["options"] = asdict(options)
            manifest["stages"]["index"] = {"status": "missing"}
            (quantised / "manifest.json").write_text(json.dumps(manifest))
        start = time.perf_counter()
        build_datastore(args.db, args.model, quantised, options)
        index_seconds[name] = time.perf_counter() - start
        stores[name] = quantised
    rows = {}
    for name, store in stores.items():
        report = evaluate(args.db, [args.test], args.model, leakage=False, work_dir=work / f"eval-{name}",
                          exclude_near_duplicates=True, knn=KnnOptions(datastore=store))
        methods = {r["method"]: r["bpb"] for r in report["knn_lm"]["methods"]}
        rows[name] = {"disk_bytes": disk_bytes(store), **methods}
        print(name, json.dumps(rows[name]), flush=True)
    print(f"\nDB {args.db}: {db_bytes:,} bytes on disk; --nprobe {args.nprobe}; ivfpq indexes built from the copied "
          "keys in " + ", ".join(f"{s:.0f} s ({name})" for name, s in index_seconds.items()))
    print("| datastore | disk | × the DB | kNN-LM bpb | RETRO + kNN-LM bpb | bucketed: kNN-LM / RETRO + kNN-LM |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['disk_bytes'] / 1e6:.1f} MB | {row['disk_bytes'] / db_bytes:.2f}× | "
              f"{row['knn_lm']:.4f} | {row['retro_knn_lm']:.4f} | "
              f"{row.get('knn_lm_bucketed', float('nan')):.4f} / "
              f"{row.get('retro_knn_lm_bucketed', float('nan')):.4f} |")
    for name in stores:
        if name == "hnsw":
            continue
        changes = [f"{method} {rows[name][method] / rows['hnsw'][method] - 1:+.2%}"
                   for method in ("knn_lm", "retro_knn_lm", "knn_lm_bucketed", "retro_knn_lm_bucketed")
                   if method in rows["hnsw"]]
        print(f"{name} against hnsw (the anchor): " + ", ".join(changes))


if __name__ == "__main__":
    main()
