"""Options that several commands share, declared once. Defaults stay on each command's parameters and
come from retrocli.options, the constants the API uses, so the CLI and the API cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrocli.options import IndexOptions


def flag(name: str, help: str):
    """An on/off option that defaults to off: just `--name`, with no `--no-name` twin and no type shown."""
    return typer.Option(name, help=help, metavar="")


def field_option(options_class, name: str, *flags: str):
    """The option for a field of an options dataclass (retrocli.options), with the field's help text."""
    from retrocli.options import help_of

    return typer.Option(*flags, help=help_of(options_class, name))


JsonOut = Annotated[bool, flag("--json", "Print JSON for machines instead of tables")]

# corpus and chunking (chunk, build-db, train-tokenizer; the test set of leakage-report, dedupe, eval)
Inputs = Annotated[
    list[Path], typer.Argument(help="Files or directories: .txt/.md/.rst, .jsonl(.gz), .parquet", readable=False)
]
TextField = Annotated[str, typer.Option(help="JSONL/Parquet field holding the document text")]
IdField = Annotated[
    str | None,
    typer.Option(help="JSONL/Parquet field holding a document id (default: 'id' where a record has one; '' for none)"),
]
Strict = Annotated[bool, flag("--strict", "Fail on invalid UTF-8 instead of replacing it")]
TokenizerOpt = Annotated[
    str | None, typer.Option(
        help="smollm2 or retrocli-bpe-8k (packaged), a HF tokenizer.json, or a directory holding one "
             "(default: smollm2)")
]
ChunkSize = Annotated[int, typer.Option(help="Tokens per chunk (RETRO: 64)")]
AllowDuplicates = Annotated[
    bool,
    flag("--allow-duplicates", "Chunk a file that is given twice twice, instead of refusing"),
]

# embedding and indexing (embed, index, build-db)
Embedder = Annotated[str, typer.Option(help="HF model id or local directory of a BERT (default: packaged MiniLM)")]
Precision = Annotated[str, typer.Option(
    help="auto (bf16 where the CPU has native bf16: AMX or AVX512-BF16; else fp32), fp32, or bf16 "
         "(autocast; slow without native bf16). A DB already embedded keeps its precision")]
BatchSize = Annotated[int, typer.Option(help="Chunks per BERT forward pass")]
Threads = Annotated[int | None, typer.Option(help="Torch/hnswlib threads (default: all cores; 1 per task with --dask)")]
IndexThreads = Annotated[int | None, field_option(IndexOptions, "threads", "--threads")]
LocalThreads = Annotated[int | None, typer.Option("--threads", help="Torch/hnswlib threads (default: all cores)")]
BlockSize = Annotated[int, typer.Option(help="Chunks per resumable block (one zarr chunk)")]
Space = Annotated[str, field_option(IndexOptions, "space")]
MOpt = Annotated[int, field_option(IndexOptions, "M", "--M")]
EfConstruction = Annotated[int, field_option(IndexOptions, "ef_construction")]
ShardSize = Annotated[int, field_option(IndexOptions, "shard_size")]
Seed = Annotated[int, field_option(IndexOptions, "seed")]
CacheDir = Annotated[Path | None, typer.Option(
    help="Where a DB given as a URL (s3://bucket/db, gs://…) is copied to work on (or RETRO_CACHE_DIR)")]
Dask = Annotated[
    str | None,
    typer.Option(help="Run on Dask: a scheduler address (tcp://host:8786) or local:N worker processes"),
]

# retrieval (neighbors, leakage-report, dedupe, generate)
Ef = Annotated[int, typer.Option(help="HNSW search width (accuracy vs speed)")]

# test sets (leakage-report, dedupe, eval)
TestInputs = Annotated[
    list[Path], typer.Option("--test", help="Test set: files/dirs as for `retro chunk` (repeatable)", readable=False)
]
KNeighbors = Annotated[int, typer.Option("--k", help="Neighbours (with continuations) per test chunk")]
Alpha = Annotated[float, typer.Option(help="A chunk leaks when r(C) > alpha (paper: 0.125)")]
NGram = Annotated[int, typer.Option(help="n of the n-grams for document Jaccard (paper: 13)")]
NumPerm = Annotated[int, typer.Option(help="MinHash permutations")]
JaccardThreshold = Annotated[float, typer.Option(help="Near-duplicate when n-gram Jaccard ≥ this (paper: 0.8)")]
WorkDir = Annotated[Path | None, typer.Option(help="Keep the embedded test set here (resumable); default: temp")]

# models (eval, generate)
ModelDir = Annotated[Path | None, typer.Option(help="Model directory (default: the bundled model)")]
Normalize = Annotated[str, typer.Option(
    help="Compare text through reformatting: 'text' (NFKC and whitespace runs collapsed for r(C); also lowercase "
         "and no punctuation for near-duplicates) or 'none' (raw LM tokens, the paper's definition)")]
ExcludeNearDuplicates = Annotated[bool, flag(
    "--exclude-near-duplicates",
    "Drop from each test document's neighbours the DB documents that near-duplicate it (13-gram Jaccard ≥ 0.8)")]
Device = Annotated[str, typer.Option(
    help="Where BERT and the model run: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")]
Devices = Annotated[str | None, typer.Option(
    help="Embed with one worker process per device: all (every GPU) or a list such as cuda:0,cuda:1")]
