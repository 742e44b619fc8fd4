"""What checking a DB costs: `retro verify` against hashing the same files with nothing else (the anchor),
the open-time check against opening without it, and reading the arrays through the checked store against
plain zarr, all measured in this run on one DB.

    .venv/bin/python bench/bench_verify.py --db DB [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import zarr

    from retrocli.db import STORE, open_db, recorded_files
    from retrocli.verify import verify_db

    db_path = Path(args.db)
    result = verify_db(db_path)
    assert result.ok, result.problems
    summary = result.to_dict()
    files = [db_path / "tokenizer.json"]
    files += [db_path / STORE / array / rel for array, recs in recorded_files(open_db(db_path).manifest).items()
              for rel in recs]
    files += [db_path / s["file"] for s in open_db(db_path).manifest.get("index", {}).get("shards", [])]

    def hash_all():
        for file in files:
            hashlib.sha256(file.read_bytes()).hexdigest()

    # Warm the page cache once so both sides read from memory, not disk.
    hash_all()
    anchor = best_of(args.repeats, hash_all)
    verify = best_of(args.repeats, lambda: verify_db(db_path))
    print(f"DB {db_path}: {open_db(db_path).num_chunks:,} chunks, {summary['files']:,} files, "
          f"{summary['bytes'] / 1e6:,.1f} MB")
    print(f"retro verify: {verify:.3f} s ({summary['bytes'] / 1e6 / verify:,.0f} MB/s); anchor (sha256 of the "
          f"same files, nothing else): {anchor:.3f} s; ratio {verify / anchor:.2f}")

    opened = best_of(args.repeats * 3, lambda: open_db(db_path))
    unchecked = best_of(args.repeats * 3, lambda: open_db(db_path, check_files=False))
    print(f"open_db with the per-file size check: {opened * 1e3:.1f} ms; anchor (without it): "
          f"{unchecked * 1e3:.1f} ms; ratio {opened / unchecked:.2f}")

    arrays = [a for a in ("chunks/tokens", "embeddings") if a in open_db(db_path).root]
    plain = zarr.open_group(str(db_path / STORE), mode="r")

    def read_checked():
        db = open_db(db_path)
        for array in arrays:
            db.root[array][:]

    def read_plain():
        for array in arrays:
            plain[array][:]

    checked_s = best_of(args.repeats, read_checked)
    plain_s = best_of(args.repeats, read_plain)
    print(f"reading {' + '.join(arrays)} whole through the checked store: {checked_s:.3f} s; anchor (plain "
          f"zarr LocalStore): {plain_s:.3f} s; ratio {checked_s / plain_s:.2f}")
    print(f"(each the best of {args.repeats} runs, page cache warm)")


if __name__ == "__main__":
    main()
