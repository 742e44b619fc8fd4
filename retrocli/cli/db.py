"""Commands that build a DB: chunk, info, train-tokenizer, embed, index, build-db."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from retrocli.cli.common import (
    cluster,
    console,
    err_console,
    handle_errors,
    human_bytes,
    print_json,
    progress_display,
    user,
)
from retrocli.cli.options import (
    AllowDuplicates,
    BatchSize,
    BlockSize,
    CacheDir,
    ChunkSize,
    Dask,
    Device,
    Devices,
    EfConstruction,
    Embedder,
    IdField,
    IndexThreads,
    Inputs,
    JsonOut,
    Kind,
    MOpt,
    Nlist,
    Nprobe,
    Opq,
    PqBytes,
    Precision,
    Rerank,
    Seed,
    ShardSize,
    Space,
    Strict,
    TextField,
    Threads,
    TokenizerOpt,
    flag,
)
from retrocli.options import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EMBED_BATCH,
    DEFAULT_EMBEDDER,
    DEFAULT_INDEX_KIND,
    DEFAULT_INDEX_SEED,
    DEFAULT_M,
    DEFAULT_NPROBE,
    DEFAULT_PQ_BYTES,
    DEFAULT_PRECISION,
    DEFAULT_RERANK,
    DEFAULT_SHARD_SIZE,
    DEFAULT_SPACE,
    DEFAULT_TEXT_FIELD,
    DEFAULT_VOCAB_SIZE,
    ChunkOptions,
    EmbedOptions,
    IndexOptions,
    check_seed,
    check_threads,
)
from retrocli.storage import local_db, local_inputs


@handle_errors
def chunk(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="DB directory to create")],
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE,
    tokenizer: TokenizerOpt = None,
    text_field: TextField = DEFAULT_TEXT_FIELD,
    id_field: IdField = None,
    strict: Strict = False,
    allow_duplicates: AllowDuplicates = False,
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing DB at --out")] = False,
    dask: Dask = None,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Tokenize a corpus and cut it into chunks: the DB every other command reads."""
    from retrocli.chunk import chunk_corpus

    options = ChunkOptions(chunk_size=chunk_size, tokenizer=tokenizer, text_field=text_field, id_field=id_field,
                           strict=strict, allow_duplicates=allow_duplicates)
    with local_db(out, cache_dir, write="retro chunk") as out, cluster(dask) as client, \
            progress_display(enabled=not json_output) as progress:
        db = chunk_corpus(local_inputs(inputs, cache_dir), out, options, overwrite=overwrite, progress=progress,
                          dask=client)
    stage = db.manifest["stages"]["chunk"]
    if json_output:
        print_json({"path": str(db.path), "counts": db.manifest["counts"], "corpus": stage["corpus"]})
        return
    corpus = stage["corpus"]
    counts = db.manifest["counts"]
    console.print(
        f"[green]chunked[/] {counts['documents']:,} documents into {counts['chunks']:,} chunks "
        f"({counts['tokens']:,} tokens) in {stage['seconds']:.1f}s → {user(db.path)}"
    )
    if corpus["empty_skipped"]:
        console.print(f"skipped {corpus['empty_skipped']} empty documents")
    if corpus["invalid_utf8_documents"]:
        replaced = corpus["invalid_utf8_documents"]
        console.print(f"replaced invalid UTF-8 in {replaced} documents (--strict to fail)")
    for path in corpus["binary_skipped"]:
        err_console.print(f"[yellow]warning:[/] skipped binary file {user(path)}", soft_wrap=True)

@handle_errors
def info(db: Annotated[Path, typer.Argument(help="DB directory or URL")], cache_dir: CacheDir = None,
         json_output: JsonOut = False):
    """Summarise a DB: documents, chunks, tokens, tokenizer, stages and size on disk."""
    from retrocli.info import db_info

    with local_db(db, cache_dir) as path:
        data = db_info(path)
    if json_output:
        print_json(data)
        return
    counts = data["counts"]
    # The path on its own line, never wrapped: a table title would cut a long path anywhere.
    console.print(f"[bold]retro DB[/] {user(data['path'])}", soft_wrap=True, highlight=False)
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    removed = data["removed"]
    gone = f"  ({removed['documents']:,} removed, {data['live']['documents']:,} live)" if removed["documents"] else ""
    table.add_row("documents", f"{counts['documents']:,}{gone}")
    gone = f"  ({removed['chunks']:,} removed)" if removed["chunks"] else ""
    table.add_row("chunks", f"{counts['chunks']:,}  (chunk size {data['chunk_size']}){gone}")
    added = f", {data['segments']} added segment(s)" if data["segments"] else ""
    table.add_row("version", f"{data['version']}{added}")
    table.add_row("tokens", f"{counts['tokens']:,}")
    tok = data["tokenizer"]
    table.add_row("tokenizer", f"{user(tok['name'])}  vocab {tok['vocab_size']:,}  sha256 {tok['sha256'][:12]}…")
    table.add_row("stages", "  ".join(f"{k}: {v}" for k, v in data["stages"].items()))
    if data["embedder"]:
        emb = data["embedder"]
        table.add_row("embedder", f"{user(emb['name'])}  dim {emb['dim']}  {emb['pooling']}  {emb['precision']}")
    if data["index"]:
        idx = data["index"]
        table.add_row("index", f"{describe_index(idx)}  shards {len(idx['shards'])}")
    for name, size in data["disk_bytes"].items():
        table.add_row(f"  {user(name)}", human_bytes(size))
    table.add_row("on disk", human_bytes(sum(data["disk_bytes"].values())))
    console.print(table)

@handle_errors
def verify(db: Annotated[Path, typer.Argument(help="DB directory or URL, a kNN-LM datastore or batch neighbours")],
           cache_dir: CacheDir = None, json_output: JsonOut = False):
    """Check every file of a DB (or a kNN-LM datastore, or batch neighbours) against the checksums its stages
    recorded. Exit 1 if any is damaged."""
    from retrocli.db import DATASTORE_FORMAT
    from retrocli.verify import artefact_format, verify_path

    with local_db(db, cache_dir) as path, progress_display(enabled=not json_output) as progress:
        if artefact_format(path) == DATASTORE_FORMAT:
            from retrocli.datastore import verify_datastore  # only then: it imports torch

            result = verify_datastore(path, progress=progress)
        else:
            result = verify_path(path, progress=progress)
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(f"[bold]retro verify[/] {user(result.path)}", soft_wrap=True, highlight=False)
        table = Table()
        for column in ("stage", "status", "files", "size"):
            table.add_column(column, justify="right" if column in ("files", "size") else "left")
        for check in result.stages:
            style = "green" if check.status == "complete" else "red" if check.problems else "yellow"
            table.add_row(check.stage, f"[{style}]{check.status}[/]", f"{check.files:,}", human_bytes(check.bytes))
        console.print(table)
        for problem in result.problems:
            err_console.print(f"[red]damaged:[/] {user(problem)}", highlight=False, soft_wrap=True)
        total = result.to_dict()
        verdict = "[green]intact[/]" if result.ok else f"[red]{len(result.problems)} problem(s)[/]"
        console.print(f"checked {total['files']:,} files ({human_bytes(total['bytes'])}) in "
                      f"{result.seconds:.2f}s: {verdict}")
    if not result.ok:
        raise typer.Exit(1)


@handle_errors
def train_tokenizer_cmd(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="tokenizer.json to write")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size including 256 byte tokens")] = DEFAULT_VOCAB_SIZE,
    text_field: TextField = DEFAULT_TEXT_FIELD,
):
    """Train a byte-level BPE tokenizer (lossless for any UTF-8 text) on a corpus."""
    from retrocli.tokenizer import train_tokenizer

    tok = train_tokenizer(inputs, vocab_size=vocab_size, out=out, text_field=text_field)
    shown = user(out)
    console.print(f"[green]trained[/] vocab {tok.vocab_size:,} → {shown}  sha256 {tok.sha256[:12]}…")

def _embed_summary(db) -> None:
    emb = db.manifest["embedder"]
    secs = db.manifest["stages"]["embed"].get("seconds", 0)
    console.print(
        f"[green]embedded[/] {db.num_chunks:,} chunks with {user(emb['name'])} ({emb['dim']}-d, "
        f"{emb['pooling']} pooling, {emb['precision']}) in {secs:.1f}s"
    )


def describe_index(idx: dict) -> str:
    """An index record in one line: its kind and what it was built with."""
    if idx.get("kind", "hnsw") == "hnsw":
        return f"hnsw {idx['space']} M={idx['M']} ef_construction={idx['ef_construction']}"
    trained = idx.get("trained", {})
    return (f"ivfpq {idx['space']} {trained.get('factory', '')} nprobe={idx['nprobe']} rerank={idx['rerank']}")


def _index_summary(db) -> None:
    idx = db.manifest["index"]
    console.print(
        f"[green]indexed[/] {db.num_chunks:,} vectors: {describe_index(idx)}, {len(idx['shards'])} shard(s)"
    )

@handle_errors
def embed(
    db: Annotated[Path, typer.Argument(help="DB directory (chunked)")],
    embedder: Embedder = DEFAULT_EMBEDDER,
    precision: Precision = DEFAULT_PRECISION,
    batch_size: BatchSize = DEFAULT_EMBED_BATCH,
    threads: Threads = None,
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    dask: Dask = None,
    device: Device = "auto",
    devices: Devices = None,
    cache_dir: CacheDir = None,
):
    """Embed every chunk with a frozen BERT (mean-pooled) into zarr; resumes an interrupted run."""
    from retrocli.embed import embed_db, warn_slow_bf16

    warn_slow_bf16(precision, err_console)
    with local_db(db, cache_dir, write="retro embed") as db, cluster(dask) as client, \
            progress_display() as progress:
        options = EmbedOptions(embedder, precision, batch_size, threads, block_size)
        out = embed_db(db, options, progress=progress, dask=client, device=device, devices=devices)
    _embed_summary(out)

@handle_errors
def index(
    db: Annotated[Path, typer.Argument(help="DB directory (embedded)")],
    kind: Kind = DEFAULT_INDEX_KIND,
    space: Space = DEFAULT_SPACE,
    m: MOpt = DEFAULT_M,
    ef_construction: EfConstruction = DEFAULT_EF_CONSTRUCTION,
    nlist: Nlist = 0,
    pq_bytes: PqBytes = DEFAULT_PQ_BYTES,
    opq: Opq = False,
    nprobe: Nprobe = DEFAULT_NPROBE,
    rerank: Rerank = DEFAULT_RERANK,
    shard_size: ShardSize = DEFAULT_SHARD_SIZE,
    seed: Seed = DEFAULT_INDEX_SEED,
    threads: IndexThreads = None,
    overwrite: Annotated[bool, flag("--overwrite", "Rebuild an existing index")] = False,
    dask: Dask = None,
    cache_dir: CacheDir = None,
):
    """Build the sharded index over the embeddings (hnswlib HNSW or faiss IVF-PQ); resumes at the next unfinished
    shard."""
    from retrocli.index import index_db, remove_index

    check_seed(seed)
    with local_db(db, cache_dir, write="retro index") as db, cluster(dask) as client, \
            progress_display() as progress:
        if overwrite:
            remove_index(db)
        options = IndexOptions(kind=kind, space=space, M=m, ef_construction=ef_construction, shard_size=shard_size,
                               seed=seed, threads=threads, nlist=nlist, pq_bytes=pq_bytes, opq=opq, nprobe=nprobe,
                               rerank=rerank)
        out = index_db(db, options, progress=progress, dask=client)
    _index_summary(out)

@handle_errors
def build_db_cmd(
    inputs: Inputs,
    out: Annotated[Path, typer.Option(help="DB directory to create or resume")],
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE,
    tokenizer: TokenizerOpt = None,
    text_field: TextField = DEFAULT_TEXT_FIELD,
    id_field: IdField = None,
    strict: Strict = False,
    allow_duplicates: AllowDuplicates = False,
    embedder: Embedder = DEFAULT_EMBEDDER,
    precision: Precision = DEFAULT_PRECISION,
    batch_size: BatchSize = DEFAULT_EMBED_BATCH,
    threads: Threads = None,
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    kind: Kind = DEFAULT_INDEX_KIND,
    space: Space = DEFAULT_SPACE,
    m: MOpt = DEFAULT_M,
    ef_construction: EfConstruction = DEFAULT_EF_CONSTRUCTION,
    nlist: Nlist = 0,
    pq_bytes: PqBytes = DEFAULT_PQ_BYTES,
    opq: Opq = False,
    nprobe: Nprobe = DEFAULT_NPROBE,
    rerank: Rerank = DEFAULT_RERANK,
    shard_size: ShardSize = DEFAULT_SHARD_SIZE,
    seed: Seed = DEFAULT_INDEX_SEED,
    overwrite: Annotated[bool, flag("--overwrite", "Rebuild from scratch")] = False,
    dask: Dask = None,
    device: Device = "auto",
    devices: Devices = None,
    cache_dir: CacheDir = None,
):
    """chunk → embed → index in one command; a rerun skips finished stages and resumes the rest."""
    from retrocli.build_db import build_db
    from retrocli.embed import warn_slow_bf16

    check_threads(threads)  # before any work: the chunk stage would commit first
    check_seed(seed)
    warn_slow_bf16(precision, err_console)
    with local_db(out, cache_dir, write="retro build-db") as out, cluster(dask) as client, \
            progress_display() as progress:
        db = build_db(
            local_inputs(inputs, cache_dir), out,
            chunk_options=ChunkOptions(chunk_size=chunk_size, tokenizer=tokenizer, text_field=text_field,
                                       id_field=id_field, strict=strict, allow_duplicates=allow_duplicates),
            index_options=IndexOptions(kind=kind, space=space, M=m, ef_construction=ef_construction,
                                       shard_size=shard_size, seed=seed, threads=threads, nlist=nlist,
                                       pq_bytes=pq_bytes, opq=opq, nprobe=nprobe, rerank=rerank),
            overwrite=overwrite, progress=progress, dask=client, device=device, devices=devices,
            embed_options=EmbedOptions(embedder, precision, batch_size, threads, block_size),
        )
    counts = db.manifest["counts"]
    console.print(f"[green]built[/] {user(db.path)}: {counts['documents']:,} documents, {counts['chunks']:,} chunks")
    _embed_summary(db)
    _index_summary(db)


@handle_errors
def add(
    db: Annotated[Path, typer.Argument(help="DB directory or URL (built)")],
    inputs: Annotated[list[Path], typer.Argument(help="Files, directories or URLs of new documents", readable=False)],
    text_field: Annotated[str | None, typer.Option(help="JSONL/Parquet text field (default: the DB's)")] = None,
    id_field: Annotated[str | None, typer.Option(help="JSONL/Parquet id field (default: the DB's)")] = None,
    strict: Strict = False,
    allow_duplicates: Annotated[
        bool, flag("--allow-duplicates", "Add a file the DB already holds (or one given twice) again")] = False,
    batch_size: BatchSize = DEFAULT_EMBED_BATCH,
    threads: Threads = None,
    device: Device = "auto",
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Add documents to a built DB: chunked, embedded and indexed as the DB was; nothing else moves."""
    from retrocli.add import add_documents

    with local_db(db, cache_dir, write="retro add") as path, progress_display(enabled=not json_output) as progress:
        summary = add_documents(path, local_inputs(inputs, cache_dir), text_field=text_field, id_field=id_field,
                                strict=strict or None,
                                allow_duplicates=allow_duplicates, batch_size=batch_size, threads=threads,
                                device=device, progress=progress)
    if json_output:
        print_json(summary)
        return
    last_doc = summary["first_doc"] + summary["documents"] - 1
    console.print(
        f"[green]added[/] {summary['documents']:,} document{'s' if summary['documents'] != 1 else ''} "
        f"(ids {summary['first_doc']:,}–{last_doc:,}), "
        f"{summary['chunks']:,} chunks, in {summary['seconds']:.1f}s → {user(db)} version {summary['version']}"
    )


@handle_errors
def remove(
    db: Annotated[Path, typer.Argument(help="DB directory or URL")],
    source: Annotated[list[str] | None, typer.Option(
        help="Shell-style glob matched against each document's source, e.g. '*chapter_20.txt*' (repeatable)")] = None,
    doc: Annotated[list[int] | None, typer.Option(help="Document id (repeatable)")] = None,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Remove documents: their chunks are never returned again (no re-embedding; `retro compact` drops them)."""
    from retrocli.remove import remove_documents

    with local_db(db, cache_dir, write="retro remove") as path:
        summary = remove_documents(path, source or [], doc or [])
    if json_output:
        print_json(summary)
        return
    already = f" ({summary['already_removed']} were removed already)" if summary["already_removed"] else ""
    console.print(
        f"[green]removed[/] {len(summary['removed']):,} document{'s' if len(summary['removed']) != 1 else ''}"
        f"{already} → {user(db)} version "
        f"{summary['version']}: {summary['live_documents']:,} live documents, {summary['removed_chunks']:,} "
        "removed chunks"
    )


@handle_errors
def compact(
    db: Annotated[Path, typer.Argument(help="DB directory or URL")],
    out: Annotated[Path, typer.Option(help="New DB directory or URL to write")],
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing DB at --out")] = False,
    cache_dir: CacheDir = None,
    json_output: JsonOut = False,
):
    """Write a copy of a DB without its removed documents, added segments folded in (vectors are copied)."""
    from retrocli.compact import compact_db

    with local_db(db, cache_dir) as source, local_db(out, cache_dir, write="retro compact") as target, \
            progress_display(enabled=not json_output) as progress:
        new = compact_db(source, target, overwrite=overwrite, progress=progress)
    counts = new.manifest["counts"]
    if json_output:
        print_json({"path": str(new.path), "counts": counts, "derived_from": new.manifest["derived_from"]})
        return
    dropped = len(new.manifest["derived_from"]["removed_documents"])
    console.print(f"[green]compacted[/] {user(db)} → {user(new.path)}: {counts['documents']:,} documents, "
                  f"{counts['chunks']:,} chunks ({dropped:,} removed documents left out)")
