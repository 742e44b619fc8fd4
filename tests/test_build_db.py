import json

from helpers import tree_snapshot

from retrocli.db import open_db
from retrocli.options import EmbedOptions


def test_build_db_cli_then_rerun_skips(tmp_path, small_jsonl, tiny_bert, cli):
    out = tmp_path / "db"
    result = cli("build-db", small_jsonl, "--out", out, "--embedder", tiny_bert, "--block-size", "50")
    assert result.exit_code == 0, result.output
    db = open_db(out)
    assert [db.stage(s) for s in ("chunk", "embed", "index")] == ["complete"] * 3
    before = tree_snapshot(out)
    result = cli("build-db", small_jsonl, "--out", out, "--embedder", tiny_bert, "--block-size", "50")
    assert result.exit_code == 0 and tree_snapshot(out) == before
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["stages"] == {"chunk": "complete", "embed": "complete", "index": "complete"}
    assert info["embedder"]["name"] == tiny_bert and "embeddings" in info["disk_bytes"]


def test_build_db_resumes_interrupted_embed(tmp_path, small_jsonl, tiny_bert, cli):
    from retrocli.chunk import chunk_corpus
    from retrocli.embed import embed_db

    out = tmp_path / "db"
    chunk_corpus([small_jsonl], out)
    embed_db(out, max_blocks=2, options=EmbedOptions(embedder=tiny_bert, block_size=20))
    result = cli("build-db", small_jsonl, "--out", out, "--embedder", tiny_bert)
    assert result.exit_code == 0, result.output
    db = open_db(out)
    assert db.stage("index") == "complete" and db.manifest["stages"]["embed"]["block_size"] == 20


def test_build_db_other_inputs_refused(tmp_path, small_jsonl, tiny_bert, cli):
    out = tmp_path / "db"
    cli("build-db", small_jsonl, "--out", out, "--embedder", tiny_bert)
    other = tmp_path / "other.txt"
    other.write_text("hello world")
    result = cli("build-db", other, "--out", out, "--embedder", tiny_bert)
    assert result.exit_code != 0 and "--overwrite" in result.output
