"""Options that several commands share, declared once. Defaults stay on each command's parameters and
come from retrocli.options, the constants the API uses, so the CLI and the API cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrocli.options import EmbedOptions, IndexOptions, LeakageOptions, help_of


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
Embedder = Annotated[str, field_option(EmbedOptions, "embedder")]
Precision = Annotated[str, field_option(EmbedOptions, "precision")]
BatchSize = Annotated[int, field_option(EmbedOptions, "batch_size")]
Threads = Annotated[int | None, field_option(EmbedOptions, "threads")]
IndexThreads = Annotated[int | None, field_option(IndexOptions, "threads", "--threads")]
LocalThreads = Annotated[int | None, typer.Option("--threads", help="Torch/hnswlib threads (default: all cores)")]
BlockSize = Annotated[int, field_option(EmbedOptions, "block_size")]
Space = Annotated[str, field_option(IndexOptions, "space")]
MOpt = Annotated[int, field_option(IndexOptions, "M", "--M")]
EfConstruction = Annotated[int, field_option(IndexOptions, "ef_construction")]
ShardSize = Annotated[int, field_option(IndexOptions, "shard_size")]
Seed = Annotated[int, field_option(IndexOptions, "seed")]
Kind = Annotated[str, field_option(IndexOptions, "kind")]
Nlist = Annotated[int, field_option(IndexOptions, "nlist")]
PqBytes = Annotated[int, field_option(IndexOptions, "pq_bytes")]
Opq = Annotated[bool, flag("--opq", help_of(IndexOptions, "opq"))]
Nprobe = Annotated[int, field_option(IndexOptions, "nprobe")]
Rerank = Annotated[int, field_option(IndexOptions, "rerank")]
CacheDir = Annotated[Path | None, typer.Option(
    help="Where a DB given as a URL (s3://bucket/db, gs://…) is copied to work on (or RETRO_CACHE_DIR)")]
Dask = Annotated[
    str | None,
    typer.Option(help="Run on Dask: a scheduler address (tcp://host:8786) or local:N worker processes"),
]

# retrieval (neighbors, leakage-report, dedupe, serve, generate, eval)
Ef = Annotated[int, field_option(LeakageOptions, "ef")]
SearchNprobe = Annotated[int | None, field_option(LeakageOptions, "nprobe")]
SearchRerank = Annotated[int | None, field_option(LeakageOptions, "rerank")]

# test sets (leakage-report, dedupe, eval)
TestInputs = Annotated[
    list[Path], typer.Option("--test", help="Test set: files/dirs as for `retro chunk` (repeatable)", readable=False)
]
KNeighbors = Annotated[int, field_option(LeakageOptions, "k", "--k")]
Alpha = Annotated[float, field_option(LeakageOptions, "alpha")]
NGram = Annotated[int, field_option(LeakageOptions, "ngram")]
NumPerm = Annotated[int, field_option(LeakageOptions, "num_perm")]
JaccardThreshold = Annotated[float, field_option(LeakageOptions, "jaccard_threshold")]
WorkDir = Annotated[Path | None, typer.Option(help="Keep the embedded test set here (resumable); default: temp")]

# models (eval, generate)
ModelDir = Annotated[Path | None, typer.Option(help="Model directory (default: the bundled model)")]
Normalize = Annotated[str, field_option(LeakageOptions, "normalize")]
ExcludeNearDuplicates = Annotated[bool, flag(
    "--exclude-near-duplicates",
    "Drop from each test document's neighbours the DB documents that near-duplicate it (13-gram Jaccard ≥ 0.8)")]
Device = Annotated[str, typer.Option(
    help="Where BERT and the model run: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")]
Devices = Annotated[str | None, typer.Option(
    help="Embed with one worker process per device: all (every GPU) or a list such as cuda:0,cuda:1")]
