"""Benchmark `retro chunk` on >= 100 MB of text: throughput, and peak memory that must stay flat.

    .venv/bin/python bench/bench_chunk.py            # or: make bench
    .venv/bin/python bench/bench_chunk.py --copies 8 --json bench-chunk.json

The corpus is the full example corpus (examples/data/train.jsonl, ~21.6 MB, made by
`python3 scripts/gather_corpus.py --out examples/data`) copied into a temp dir enough times to pass
--min-mb. Three child processes are measured, each with its own wall time and peak RSS (os.wait4 gives
the exact ru_maxrss of that child):

  1. anchor: bare `tokenizers` encode_batch over the same N copies, in the same 4M-character batches the
     chunker uses (only the encode calls are timed) -> the ceiling for our pipeline's tokens/s;
  2. `retro chunk` on 1 copy;
  3. `retro chunk` on all N copies.

It prints tokens/s and MB/s for each (per wall second and per CPU second: CPU time is less disturbed by
other load on the machine; the load average is printed too), the pipeline/anchor ratio, and peak RSS at
1 vs N copies. It fails (exit 1, a FAIL line) if the N-copy peak RSS reaches 1 GiB or grows by more than
25% over the 1-copy run.

    .venv/bin/python bench/bench_chunk.py --long-doc-mb 50

measures one single-line document instead (the committed subset's text repeated to 50 MB): peak RSS of
`retro chunk`, which tokenizes long documents in whitespace windows, against the anchor of the bare
tokenizer given the whole document at once; the token counts must be identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / "examples" / "data" / "train.jsonl"
RSS_LIMIT = 1 << 30  # 1 GiB
GROWTH_LIMIT = 1.25
# The chunker tokenizes 4M characters at a time; a smaller copy never reaches steady state.
MIN_COPY_FOR_GROWTH = 10 * 1_000_000
MB = 1_000_000


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a child to completion; return its wall time, exit code, peak RSS (bytes) and output."""
    out = tempfile.TemporaryFile(mode="w+")
    err = tempfile.TemporaryFile(mode="w+")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return {
        "cmd": cmd,
        "seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "returncode": proc.returncode,
        "peak_rss": usage.ru_maxrss * 1024,  # Linux reports KiB
        "stdout": out.read(),
        "stderr": err.read(),
    }


def anchor_worker(files: list[str]) -> None:
    """Child process: bare encode_batch over the files, batched like retro chunk; prints JSON."""
    from retrocli.chunk import TOKENIZE_BATCH_CHARS
    from retrocli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer().tokenizer
    encode_seconds = 0.0
    tokens = chars = text_bytes = 0

    def encode(batch):
        nonlocal encode_seconds, tokens
        started = time.perf_counter()
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        encode_seconds += time.perf_counter() - started
        tokens += sum(len(e.ids) for e in encodings)

    started = time.perf_counter()
    for file in files:
        batch, batch_chars = [], 0
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                text = json.loads(line)["text"]
                if not text.strip():
                    continue
                batch.append(text)
                batch_chars += len(text)
                chars += len(text)
                text_bytes += len(text.encode("utf-8"))
                if batch_chars >= TOKENIZE_BATCH_CHARS:
                    encode(batch)
                    batch, batch_chars = [], 0
        if batch:
            encode(batch)
    print(
        json.dumps(
            {
                "encode_seconds": encode_seconds,
                "total_seconds": time.perf_counter() - started,
                "tokens": tokens,
                "chars": chars,
                "text_bytes": text_bytes,
            }
        )
    )


def long_doc_worker(path: str) -> None:
    """The old way, as the anchor: the whole single-line document handed to the tokenizer at once."""
    from retrocli.tokenizer import load_tokenizer

    text = json.loads(Path(path).read_text(encoding="utf-8"))["text"]
    ids = load_tokenizer().encode_batch([text])[0]
    print(json.dumps({"tokens": len(ids)}))


def long_doc_bench(megabytes: float, workdir: Path | None) -> int:
    """One single-line JSONL document of `megabytes` MB (the committed subset's text, repeated): peak RSS
    of `retro chunk` (windowed tokenization) against the bare tokenizer on the whole document."""
    from retrocli.chunk import LONG_DOC_WINDOW

    subset = REPO / "examples" / "subset" / "train.jsonl"
    texts = [json.loads(line)["text"] for line in subset.read_text(encoding="utf-8").splitlines()]
    block = "\n\n".join(texts)
    text = block * max(1, math.ceil(megabytes * MB / len(block.encode("utf-8"))))
    tmp = Path(tempfile.mkdtemp(prefix="retro-bench-long-", dir=workdir))
    try:
        doc = tmp / "long.jsonl"
        doc.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        size = doc.stat().st_size / MB
        print(f"long document: one JSONL line of {size:,.1f} MB", flush=True)
        anchor = run_measured([sys.executable, __file__, "--long-doc-worker", str(doc)])
        if anchor["returncode"] != 0:
            sys.exit(f"bench: long-document anchor failed:\n{anchor['stderr'][-2000:]}")
        print(f"[1/2] anchor (whole document to the tokenizer at once): {anchor['seconds']:.1f}s, "
              f"peak RSS {anchor['peak_rss'] / MB:,.0f} MB", flush=True)
        ours = chunk_run([doc], tmp / "db")
        print(f"[2/2] retro chunk (windows of {LONG_DOC_WINDOW:,} characters): {ours['seconds']:.1f}s, "
              f"peak RSS {ours['peak_rss'] / MB:,.0f} MB", flush=True)
        same = ours["report"]["counts"]["tokens"] == json.loads(anchor["stdout"])["tokens"]
        print(f"tokens: {ours['report']['counts']['tokens']:,} ({'identical count' if same else 'DIFFERENT'}); "
              f"peak RSS ratio retro chunk / anchor = {ours['peak_rss'] / anchor['peak_rss']:.2f}")
        if not same or ours["peak_rss"] >= RSS_LIMIT:
            print("FAIL: windowed tokenization changed the tokens or used ≥ 1 GiB", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def retro_bin() -> str:
    candidate = Path(sys.executable).with_name("retro")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("retro")
    if not found:
        sys.exit("bench: cannot find the `retro` script; run `make install` first")
    return found


def chunk_run(inputs: list[Path], out: Path) -> dict:
    result = run_measured([retro_bin(), "chunk", *map(str, inputs), "--out", str(out), "--json"])
    if result["returncode"] != 0:
        sys.exit(f"bench: retro chunk failed ({result['returncode']}):\n{result['stderr'][-2000:]}")
    result["report"] = json.loads(result["stdout"])
    result["input_bytes"] = sum(p.stat().st_size for p in inputs)
    return result


def fmt_rate(n: float, seconds: float, unit: str) -> str:
    return f"{n / seconds:,.0f} {unit}/s"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="JSONL corpus to repeat")
    parser.add_argument("--min-mb", type=float, default=100.0, help="total input to reach (MB = 10^6 B)")
    parser.add_argument("--copies", type=int, default=None, help="copies (default: enough for --min-mb)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="parent of the temp dir for copies and DBs"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    parser.add_argument("--long-doc-mb", type=float, default=None,
                        help="instead: peak RSS of one single-line document of this many MB")
    parser.add_argument("--anchor-worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--long-doc-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.anchor_worker:
        anchor_worker(args.anchor_worker)
        return 0
    if args.long_doc_worker:
        long_doc_worker(args.long_doc_worker)
        return 0
    if args.long_doc_mb:
        return long_doc_bench(args.long_doc_mb, args.workdir)

    source = args.source
    if not source.exists():
        print(
            f"bench: {source} is missing. Build the full example corpus first:\n"
            f"    python3 scripts/gather_corpus.py --out examples/data",
            file=sys.stderr,
        )
        return 2
    size = source.stat().st_size
    copies = args.copies or max(1, math.ceil(args.min_mb * MB / size))
    workdir = Path(tempfile.mkdtemp(prefix="retro-bench-", dir=args.workdir))
    try:
        files = []
        for i in range(copies):
            dst = workdir / "corpus" / f"copy{i:02d}.jsonl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dst)
            files.append(dst)
        total_bytes = size * copies
        print(f"corpus: {copies} x {source} = {total_bytes / MB:,.1f} MB in {workdir}", flush=True)
        load_before = os.getloadavg()
        print(
            f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  load average: {load_before[0]:.2f}",
            flush=True,
        )
        if load_before[0] > 0.5 * (os.cpu_count() or 1):
            print("warning: the machine is busy; wall-clock rates will be low (CPU-time rates less so)")

        base = run_measured([sys.executable, "-c", "import retrocli.cli, retrocli.chunk, zarr, tokenizers"])
        print(f"[0/3] import-only baseline: peak RSS {base['peak_rss'] / MB:,.0f} MB", flush=True)

        anchor = run_measured([sys.executable, __file__, "--anchor-worker", *map(str, files)])
        if anchor["returncode"] != 0:
            sys.exit(f"bench: anchor worker failed:\n{anchor['stderr'][-2000:]}")
        a = json.loads(anchor["stdout"])
        print(
            f"[1/3] anchor (bare encode_batch, {copies} copies): {a['encode_seconds']:.1f}s encoding, "
            f"{fmt_rate(a['tokens'], a['encode_seconds'], 'tokens')}",
            flush=True,
        )

        one = chunk_run(files[:1], workdir / "db1")
        rss = one["peak_rss"] / MB
        print(f"[2/3] retro chunk, 1 copy: {one['seconds']:.1f}s, peak RSS {rss:,.0f} MB", flush=True)
        many = chunk_run(files, workdir / "dbN")
        rss = many["peak_rss"] / MB
        print(
            f"[3/3] retro chunk, {copies} copies: {many['seconds']:.1f}s, peak RSS {rss:,.0f} MB", flush=True
        )
        load_after = os.getloadavg()
        db_files = [f for f in (workdir / "dbN").rglob("*") if f.is_file()]
        disk = {"bytes": sum(f.stat().st_size for f in db_files), "files": len(db_files)}
        tokens_dir = workdir / "dbN" / "store.zarr" / "chunks" / "tokens"
        disk["tokens_bytes"] = sum(f.stat().st_size for f in tokens_dir.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    counts = many["report"]["counts"]
    one_counts = one["report"]["counts"]
    if any(counts[k] != copies * one_counts[k] for k in ("documents", "chunks", "tokens")):
        print(f"FAIL: {copies} copies did not give {copies}x the counts of one copy", file=sys.stderr)
        return 1
    if counts["tokens"] != a["tokens"]:
        print(
            f"FAIL: retro chunk stored {counts['tokens']} tokens, bare encoding {a['tokens']}",
            file=sys.stderr,
        )
        return 1

    pipeline_tps = counts["tokens"] / many["seconds"]
    pipeline_cpu_tps = counts["tokens"] / many["cpu_seconds"]
    anchor_tps = a["tokens"] / a["encode_seconds"]
    anchor_cpu_tps = a["tokens"] / anchor["cpu_seconds"]  # the whole child, JSON parsing included
    growth = many["peak_rss"] / one["peak_rss"]
    text_mb = a["text_bytes"] / MB
    rows = [
        ("input", f"{copies} copies, {total_bytes / MB:,.1f} MB JSONL, {text_mb:,.1f} MB text"),
        (
            "documents / chunks / tokens",
            f"{counts['documents']:,} / {counts['chunks']:,} / {counts['tokens']:,}",
        ),
        ("retro chunk wall time", f"{many['seconds']:.1f} s ({many['cpu_seconds']:.1f} s CPU)"),
        (
            "retro chunk throughput",
            f"{pipeline_tps:,.0f} tokens/s, {total_bytes / MB / many['seconds']:.2f} MB/s "
            f"(per CPU second: {pipeline_cpu_tps:,.0f} tokens)",
        ),
        (
            "anchor: bare encode_batch",
            f"{anchor_tps:,.0f} tokens/s, {text_mb / a['encode_seconds']:.2f} MB/s, "
            f"{a['encode_seconds']:.1f} s "
            f"(per CPU second: {anchor_cpu_tps:,.0f} tokens)",
        ),
        (
            "pipeline / anchor",
            f"{pipeline_tps / anchor_tps:.2f} wall, {pipeline_cpu_tps / anchor_cpu_tps:.2f} CPU",
        ),
        (
            "DB on disk",
            f"{disk['bytes'] / MB:,.1f} MB in {disk['files']} files; "
            f"chunks/tokens {disk['tokens_bytes'] / MB:,.1f} MB "
            f"(raw {counts['chunks'] * 64 * 2 / MB:,.1f} MB: 64 uint16 a chunk)",
        ),
        ("load average before / after", f"{load_before[0]:.2f} / {load_after[0]:.2f}"),
        ("peak RSS, import only", f"{base['peak_rss'] / MB:,.0f} MB"),
        ("peak RSS, anchor process", f"{anchor['peak_rss'] / MB:,.0f} MB"),
        (
            "peak RSS, retro chunk 1 copy",
            f"{one['peak_rss'] / MB:,.0f} MB ({one['input_bytes'] / MB:,.1f} MB input)",
        ),
        (
            f"peak RSS, retro chunk {copies} copies",
            f"{many['peak_rss'] / MB:,.0f} MB ({many['input_bytes'] / MB:,.1f} MB input), "
            f"x{growth:.2f} vs 1 copy",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")

    failures = []
    if many["peak_rss"] >= RSS_LIMIT:
        failures.append(f"peak RSS {many['peak_rss'] / MB:,.0f} MB >= 1 GiB")
    if one["input_bytes"] < MIN_COPY_FOR_GROWTH:
        print(f"note: one copy is under {MIN_COPY_FOR_GROWTH / MB:.0f} MB, too small to fill the chunker's")
        print("      buffers: the 1-vs-N copies memory comparison is not meaningful and is not checked")
    elif growth > GROWTH_LIMIT:
        failures.append(f"peak RSS grew x{growth:.2f} from 1 to {copies} copies (limit x{GROWTH_LIMIT})")
    if failures:
        verdict = "FAIL: " + "; ".join(failures)
    else:
        verdict = "PASS: peak RSS < 1 GiB" + (
            "" if one["input_bytes"] < MIN_COPY_FOR_GROWTH else ", flat in corpus size"
        )
    print(verdict)

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "copies": copies,
                    "input_bytes": total_bytes,
                    "counts": counts,
                    "chunk_seconds": many["seconds"],
                    "chunk_cpu_seconds": many["cpu_seconds"],
                    "chunk_tokens_per_s": pipeline_tps,
                    "chunk_mb_per_s": total_bytes / MB / many["seconds"],
                    "anchor_encode_seconds": a["encode_seconds"],
                    "anchor_cpu_seconds": anchor["cpu_seconds"],
                    "anchor_tokens_per_s": anchor_tps,
                    "ratio": pipeline_tps / anchor_tps,
                    "peak_rss_import": base["peak_rss"],
                    "peak_rss_anchor": anchor["peak_rss"],
                    "peak_rss_1_copy": one["peak_rss"],
                    "peak_rss_n_copies": many["peak_rss"],
                    "disk": disk,
                    "cpus": os.cpu_count(),
                    "load_before": load_before[0],
                    "load_after": load_after[0],
                    "verdict": verdict,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
