"""The `retro` command: a thin typer layer over the Python API. Each command's signature is its interface."""

from __future__ import annotations

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
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
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


Inputs = Annotated[list[Path], typer.Argument(help="Files or directories: .txt/.md/.rst, .jsonl(.gz), .parquet")]
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
    corpus = stage["corpus"]
    counts = db.manifest["counts"]
    console.print(
        f"[green]chunked[/] {counts['documents']:,} documents into {counts['chunks']:,} chunks "
        f"({counts['tokens']:,} tokens) in {stage['seconds']:.1f}s → {db.path}"
    )
    if corpus["empty_skipped"]:
        console.print(f"skipped {corpus['empty_skipped']} empty documents")
    if corpus["invalid_utf8_documents"]:
        console.print(f"replaced invalid UTF-8 in {corpus['invalid_utf8_documents']} documents (--strict to fail)")
    for path in corpus["binary_skipped"]:
        err_console.print(f"[yellow]warning:[/] skipped binary file {path}")


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
    table = Table(title=f"retro DB {data['path']}", show_header=False)
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
    console.print(f"[green]trained[/] vocab {tok.vocab_size:,} → {out}  sha256 {tok.sha256[:12]}…")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
