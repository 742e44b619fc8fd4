"""Shared fixtures: corpus files on disk, the real CLI (in-process and as a subprocess), a chunked subset DB.

Nothing here is mocked: the corpus is real files, the CLI is `retrocli.cli.app` or the installed
`retro` script, and `subset_db` is the committed example subset chunked with the packaged tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import RETRO_BIN, SUBSET_TRAIN, TRAIN_OPTS, make_tiny_bert, small_corpus

from retrocli.options import EmbedOptions, NeighborOptions

# -- corpus files ------------------------------------------------------------------------------------


def _jsonl_bytes(records) -> bytes:
    """A record is a dict/list (dumped as JSON), a str (written as the raw line) or bytes (raw line)."""
    lines = []
    for rec in records:
        if isinstance(rec, bytes):
            lines.append(rec)
        elif isinstance(rec, str):
            lines.append(rec.encode("utf-8", "surrogatepass"))
        else:
            lines.append(json.dumps(rec).encode("utf-8"))
    return b"".join(line + b"\n" for line in lines)


def write_corpus_file(path: Path, content) -> Path:
    """Write one corpus file, choosing the encoding from its name.

    bytes: the file's raw content, whatever its name (to write corrupt or non-UTF-8 files).
    .txt/.md/.rst and anything else: a str, written as UTF-8.
    .jsonl / .jsonl.gz: a list of records (see `_jsonl_bytes`), gzipped for .gz.
    .parquet: a list of dicts (one row each) or a pyarrow Table.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = content if isinstance(content, pa.Table) else pa.Table.from_pylist(list(content))
        pq.write_table(table, path, row_group_size=700)  # several row groups, batches cross them
    elif name.endswith((".jsonl", ".jsonl.gz")):
        data = _jsonl_bytes(content)
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


@pytest.fixture
def make_corpus(tmp_path) -> Callable[..., Path]:
    """make_corpus({"a.txt": "text", "d/b.jsonl": [{"text": ...}], ...}, name="corpus") -> the corpus dir."""
    counter = {"n": 0}

    def make(files: dict[str, object], name: str | None = None) -> Path:
        counter["n"] += 1
        root = tmp_path / (name or f"corpus{counter['n']}")
        root.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            write_corpus_file(root / rel, content)
        return root

    return make


def read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)[field] for line in handle if line.strip()]


# -- the CLI ------------------------------------------------------------------------------------------


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]


def _run_in_process(args) -> CliResult:
    # Click 8.2+ keeps stderr apart (result.stderr). The error console is a rich Console(stderr=True)
    # made at import; rich looks up sys.stderr on every print, so CliRunner's swapped stream sees it.
    from typer.testing import CliRunner

    from retrocli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exc)


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """cli("chunk", path, "--out", db) runs `retro` in-process; an uncaught exception lands in .exception."""
    return lambda *args: _run_in_process(args)


def run_retro(*args, cwd=None, user: int | None = None, timeout: float = 120) -> CliResult:
    """Run the installed `retro` script as a real process (optionally as another uid, via setpriv)."""
    cmd = [str(RETRO_BIN), *[str(a) for a in args]]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def retro_proc() -> Callable[..., CliResult]:
    return run_retro


# -- a chunked DB of the committed example subset, built once per session --------------------------------


@pytest.fixture(scope="session")
def subset_db(tmp_path_factory) -> Path:
    """The committed subset (examples/subset/train.jsonl) chunked with the defaults; returns the DB path.

    Shared by the whole session: treat it as read-only (copy it before running a stage that writes).
    """
    from retrocli.chunk import chunk_corpus

    db_path = tmp_path_factory.mktemp("subset") / "db"
    chunk_corpus([SUBSET_TRAIN], db_path)
    return db_path


@pytest.fixture(scope="session")
def subset_texts() -> list[str]:
    return read_jsonl_texts(SUBSET_TRAIN)


# -- retrieval: a tiny BERT and a small DB built with it ------------------------------------------------

@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("small-corpus"))


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory, tiny_bert, small_jsonl) -> Path:
    """Chunked with the 8k BPE (what the tiny models and retro-6m read) + embedded (tiny BERT, blocks of 32)
    + indexed. Read-only: copy it before writing."""
    from retrocli.build_db import build_db
    from retrocli.options import ChunkOptions
    from retrocli.tokenizer import BPE_8K_NAME

    path = tmp_path_factory.mktemp("tiny") / "db"
    build_db(
        [small_jsonl], path, chunk_options=ChunkOptions(tokenizer=BPE_8K_NAME),
        embed_options=EmbedOptions(embedder=tiny_bert, block_size=32),
    )
    return path


@pytest.fixture
def tiny_db_copy(tiny_db, tmp_path) -> Path:
    dest = tmp_path / "db"
    shutil.copytree(tiny_db, dest)
    return dest


@pytest.fixture(scope="session")
def planted(tmp_path_factory, tiny_db):
    """Verbatim DB text, the same with every 4th word replaced, and unrelated text."""
    from retrocli.db import open_db

    db = open_db(tiny_db)
    verbatim = db.document_text(1)
    words = db.document_text(3).split(" ")
    edited = " ".join("zebra" if i % 4 == 0 else w for i, w in enumerate(words))
    unrelated = ("Quantum chromodynamics describes quarks and gluons; the strong force confines colour charge. "
                 "<script>alert('x')</script> & <b>bold</b> 🙂") * 2
    path = tmp_path_factory.mktemp("planted") / "test.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (verbatim, edited, unrelated)))
    return path


# -- a tiny trained model on tiny_db ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def self_neighbors(tiny_db, tmp_path_factory):
    """Batch neighbours of tiny_db against itself, k=2, --exclude-same-doc: what training reads."""
    from retrocli.batch_neighbors import batch_neighbors

    return batch_neighbors(
        tiny_db, [tiny_db], tmp_path_factory.mktemp("nb") / "nb",
        options=NeighborOptions(k=2, exclude_same_doc=True),
    )


@pytest.fixture(scope="session")
def trained(tiny_db, self_neighbors, tmp_path_factory):
    """A tiny model trained 12 steps on tiny_db: (model dir, train summary)."""
    from retrocli.train import TrainOptions, train

    out = tmp_path_factory.mktemp("model") / "m"
    summary = train(tiny_db, self_neighbors, out, TrainOptions(steps=12, **TRAIN_OPTS))
    return out, summary


# -- a tiny random base model that speaks tiny_db's tokens (RETRO-fitting) ------------------------------------

@pytest.fixture(scope="session")
def db_base(tmp_path_factory):
    """A random 4-layer Llama over the packaged 8k BPE (tiny_db's tokenizer), tokenizer.json beside it."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrocli.assets import asset_path
    from retrocli.tokenizer import BPE_8K_NAME, NAMED_TOKENIZERS

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(asset_path(NAMED_TOKENIZERS[BPE_8K_NAME]), out / "tokenizer.json")
    return out


def pytest_terminal_summary(terminalreporter):
    """A skipped browser module gets its own line at the end, saying how to run it (pytest -q hides why)."""
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "browser tests need" in reason:
            terminalreporter.write_line(f"NOTE: {reason.removeprefix('Skipped: ')}", yellow=True, bold=True)
            return
