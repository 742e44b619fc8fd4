"""kNN-LM: the datastore (keys = the model's final hidden states, values = next tokens), its search with
exclusions, the interpolation, and `retro eval/generate --knn-lm`."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

from retrocli.datastore import Datastore, FinalHidden
from retrocli.db import open_db
from retrocli.errors import RetroError
from retrocli.knn_datastore import build_datastore, plan_keys
from retrocli.knn_lm import Interpolation, knn_distribution, knn_target_probs, mixed_bits, tune_interpolation
from retrocli.options import DatastoreOptions, KnnOptions, SamplingOptions

SMALL = DatastoreOptions(block_size=1000, shard_size=2500, threads=1)


@pytest.fixture(scope="module")
def store(trained, tiny_db, tmp_path_factory):
    out, _ = trained
    return build_datastore(tiny_db, out, tmp_path_factory.mktemp("knn") / "store", SMALL)


def _arrays(path):
    root = zarr.open_group(str(path / "store.zarr"), mode="r")
    return {name: root[name][:] for name in ("keys", "values", "doc")}


def test_values_are_every_db_token_after_the_first_of_its_window(store, trained, tiny_db):
    db = open_db(tiny_db)
    plan = plan_keys(db, 128)
    values, docs = _arrays(store)["values"], _arrays(store)["doc"]
    expected_values, expected_docs = [], []
    for w in range(len(plan.docs)):
        tokens, lengths = db.tokens_block(int(plan.starts[w]), int(plan.stops[w]))
        flat = np.concatenate([row[:n] for row, n in zip(tokens, lengths, strict=True)])
        expected_values.append(flat[1:])
        expected_docs.append(np.full(len(flat) - 1, plan.docs[w]))
    np.testing.assert_array_equal(values, np.concatenate(expected_values))
    np.testing.assert_array_equal(docs, np.concatenate(expected_docs))
    assert Datastore(store).num_keys == len(values) == plan.num_keys > 3 * SMALL.block_size


def test_keys_are_the_final_norms_output_of_the_decoder_without_retrieval(store, trained, tiny_db):
    from retrocli.model.checkpoint import load_model
    from retrocli.sequences import chunk_rows, pad_id

    db = open_db(tiny_db)
    model, _ = load_model(trained[0], db)
    plan = plan_keys(db, model.config.seq_len)
    w = len(plan.docs) // 2  # a window in the middle (inside some block, maybe across a block edge)
    tokens, real = chunk_rows(db, int(plan.starts[w]), int(plan.stops[w]), pad_id(db))
    with FinalHidden(model) as hidden, torch.no_grad():
        model(torch.from_numpy(tokens.reshape(1, -1)), None, token_mask=torch.from_numpy(real.reshape(1, -1)))
        states = hidden.value[0].numpy()
    count = int(real.sum())
    keys = _arrays(store)["keys"][plan.offsets[w] : plan.offsets[w + 1]]
    assert len(keys) == count - 1
    np.testing.assert_allclose(keys.astype(np.float32), states[: count - 1], atol=2e-3, rtol=2e-3)


def test_an_interrupted_build_resumes_to_the_same_datastore(store, trained, tiny_db, tmp_path):
    out = tmp_path / "resumed"
    build_datastore(tiny_db, trained[0], out, SMALL, max_blocks=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["keys"]["status"] == "running" and len(manifest["stages"]["keys"]["done_blocks"]) == 2
    with pytest.raises(RetroError, match="not complete"):
        Datastore(out)
    build_datastore(tiny_db, trained[0], out, SMALL)
    a, b = _arrays(store), _arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    shards = lambda p: [s["sha256"] for s in json.loads((p / "manifest.json").read_text())["stages"]["index"]["shards"]]  # noqa: E731
    assert shards(store) == shards(out) and len(shards(out)) == 3  # one thread: the same graphs


def test_a_datastore_for_other_options_or_a_stranger_directory_is_refused(store, trained, tiny_db, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    with pytest.raises(RetroError, match="another model, DB content or options"):
        build_datastore(tiny_db, trained[0], copy, DatastoreOptions(block_size=500, shard_size=2500))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(RetroError, match="not a kNN-LM datastore"):
        build_datastore(tiny_db, trained[0], stranger, SMALL)
    assert (stranger / "notes.txt").read_text() == "mine"
    with pytest.raises(RetroError, match="inside"):
        build_datastore(tiny_db, trained[0], tiny_db / "store", SMALL)
    with pytest.raises(RetroError, match="is a file"):
        build_datastore(tiny_db, trained[0], stranger / "notes.txt", SMALL)


def test_a_damaged_shard_or_another_model_is_one_clear_error(store, trained, tiny_db, tmp_path, cli):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shard = sorted((copy / "index").glob("*.hnsw"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RetroError, match="corrupt"):
        Datastore(copy)
    other = tmp_path / "other-model"
    shutil.copytree(trained[0], other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RetroError, match="other model weights"):
        Datastore(store).check_matches(other, open_db(tiny_db))
    result = cli("eval", tiny_db, "--test", tiny_db, "--model", trained[0], "--knn-lm", copy)
    assert result.exit_code != 0 and len(result.error_lines) == 1 and "corrupt" in result.error_lines[0]


def test_search_never_returns_keys_of_excluded_documents(store):
    ds = Datastore(store)
    keys = _arrays(store)["keys"].astype(np.float32)
    queries = keys[:: max(1, len(keys) // 50)]
    ids, dists = ds.search(queries, 8)
    assert (dists[:, 0] < 1e-3).all()  # each key finds itself
    banned = np.unique(ds.docs[ids[:, 0]])[:3]
    ids_x, dists_x = ds.search(queries, 8, exclude_docs=banned)
    assert (ids_x >= 0).all() and not np.isin(ds.docs[ids_x], banned).any()
    assert (np.diff(dists_x, axis=1) >= 0).all()
    # everything but one document excluded: the filtered search still finds that document's keys
    keep = int(ds.docs[0])
    ids_one, _ = ds.search(queries[:4], 5, exclude_docs=np.setdiff1d(np.unique(ds.docs), [keep]))
    assert (ds.docs[ids_one] == keep).all()


def test_the_interpolation_by_hand():
    dists = np.array([[1.0, 2.0, np.inf], [np.inf, np.inf, np.inf]])
    values = np.array([[5, 7, 0], [0, 0, 0]])
    p = knn_target_probs(dists, values, np.array([7, 5]), temperature=1.0)
    assert p[0] == pytest.approx(np.exp(-2) / (np.exp(-1) + np.exp(-2))) and p[1] == 0
    bits_lm = np.array([3.0, 1.0])
    assert mixed_bits(bits_lm, p, 0.0) == pytest.approx(bits_lm)
    assert mixed_bits(bits_lm, p, 0.5)[0] == pytest.approx(-np.log2(0.5 * p[0] + 0.5 * 2**-3))
    # a token with no neighbour keeps p_LM whatever λ is
    assert Interpolation(1.0, 0.9).bits(bits_lm, dists, values, np.array([7, 5]))[1] == pytest.approx(1.0)
    full = knn_distribution(dists[0], values[0], 1.0, 10)
    assert float(full.sum()) == pytest.approx(1.0) and float(full[7]) == pytest.approx(p[0])


def test_tuning_finds_the_lambda_that_helps_and_none_when_knn_is_useless():
    rng = np.random.default_rng(0)
    n = 2000
    targets = rng.integers(0, 50, n)
    dists = np.sort(rng.uniform(1, 10, (n, 8)), axis=1)
    good = np.where(rng.random((n, 8)) < 0.6, targets[:, None], rng.integers(0, 50, (n, 8)))
    bits_lm = np.full(n, 4.0)  # p_LM = 1/16
    chosen, bucketed = tune_interpolation(bits_lm, dists, good, targets, buckets=4)
    assert chosen.lam >= 0.5 and len(bucketed.bucket_lambdas) == 4
    assert chosen.bits(bits_lm, dists, good, targets).sum() < bits_lm.sum()
    useless = (targets[:, None] + 1 + np.arange(8)) % 50  # never the target
    assert tune_interpolation(bits_lm, dists, useless, targets)[0].lam == 0.0


def test_eval_puts_the_four_methods_side_by_side(store, trained, tiny_db, small_jsonl, tmp_path, cli):
    from retrocli.eval import evaluate

    out, _ = trained
    work = tmp_path / "w"
    fixed = evaluate(tiny_db, [small_jsonl], out, work_dir=work, knn=KnnOptions(datastore=store, lam=0.0))
    rows = {r["method"]: r for r in fixed["knn_lm"]["methods"]}
    assert list(rows) == ["lm", "retro", "knn_lm", "retro_knn_lm"]
    assert rows["knn_lm"]["bpb"] == pytest.approx(rows["lm"]["bpb"])  # λ = 0 is the LM itself
    assert rows["retro_knn_lm"]["bpb"] == pytest.approx(rows["retro"]["bpb"])
    assert rows["lm"]["bpb"] == pytest.approx(fixed["bpb_no_retrieval"])
    # the test documents are DB documents: their copies are excluded from both kinds of retrieval
    assert fixed["excluded_near_duplicates"]["pairs"] >= fixed["test_documents"]
    auto = evaluate(tiny_db, [small_jsonl], out, work_dir=work, knn=KnnOptions(datastore=store, buckets=2))
    report = auto["knn_lm"]
    assert report["tuned_on_documents"] > 0 and report["reported_documents"] > 0
    assert report["tuned_on_documents"] + report["reported_documents"] == auto["test_documents"]
    methods = [r["method"] for r in report["methods"]]
    assert methods == ["lm", "retro", "knn_lm", "knn_lm_bucketed", "retro_knn_lm", "retro_knn_lm_bucketed"]
    for row in report["methods"]:
        assert row["bpb"] > 0 and row["curve"][-1]["bpb"] == pytest.approx(row["bpb"])
    assert report["methods"][2]["disk_bytes"] == Datastore(store).disk_bytes() > 0
    result = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--work-dir", work, "--knn-lm", store,
                 "--lambda", "0.3")
    assert result.exit_code == 0 and "RETRO+kNN-LM" in result.output and "LM alone" in result.output
    bad = cli("eval", tiny_db, "--test", small_jsonl, "--model", out, "--work-dir", work, "--knn-lm", store,
              "--lambda", "1.5")
    assert bad.exit_code != 0 and bad.error_lines == ["error: --lambda: must be in [0, 1], got 1.5"]


def test_generate_samples_from_the_mixed_distribution(store, trained, tiny_db, cli):
    from retrocli.generate import generate

    out, _ = trained
    prompt = open_db(tiny_db).document_text(2)[:300]
    plain = generate(tiny_db, prompt, out, sampling=SamplingOptions(max_new_tokens=24, temperature=0))
    zero = generate(
        tiny_db, prompt, out, sampling=SamplingOptions(max_new_tokens=24, temperature=0),
        knn=KnnOptions(datastore=store, lam=0.0),
    )
    assert zero.token_ids == plain.token_ids
    # λ = 1, greedy: each token is the most weighted value among the nearest keys
    ds = Datastore(store)
    only_knn = generate(
        tiny_db, prompt, out, retrieval=False, sampling=SamplingOptions(max_new_tokens=24, temperature=0),
        knn=KnnOptions(datastore=ds, lam=1.0),
    )
    assert only_knn.token_ids != plain.token_ids
    assert set(only_knn.token_ids) <= set(ds.values.tolist())
    result = cli("generate", "--db", tiny_db, "--prompt", prompt, "--model", out, "--knn-lm", store,
                 "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["text"]


def test_knn_datastore_cli_and_dask_build_the_same_store(store, trained, tiny_db, tmp_path, cli):
    pytest.importorskip("distributed")
    out = tmp_path / "cli-store"
    result = cli("knn-datastore", tiny_db, "--model", trained[0], "--out", out, "--block-size", "1000",
                 "--shard-size", "2500", "--dask", "local:2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["keys"] == Datastore(store).num_keys
    a, b = _arrays(store), _arrays(out)
    np.testing.assert_array_equal(a["values"], b["values"])
    np.testing.assert_array_equal(a["doc"], b["doc"])
    np.testing.assert_allclose(a["keys"].astype(np.float32), b["keys"].astype(np.float32), atol=2e-3)


# -- the datastore is checked as a DB is: recorded checksums, a manifest schema, the DB's content id ------

def _edit(path, change):
    file = path / "manifest.json"
    manifest = json.loads(file.read_text())
    change(manifest)
    file.write_text(json.dumps(manifest))


def _flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "store.zarr/values/c/0").unlink(), "chunk 0 of array values is missing"),
    (lambda s: (s / "store.zarr/doc/c/1").unlink(), "chunk 1 of array doc is missing"),
    (lambda s: _flip_byte(s / "store.zarr/values/c/0"), "chunk 0 of array values does not match its recorded sha256"),
    (lambda s: (s / "store.zarr/doc/c/1").write_bytes((s / "store.zarr/doc/c/1").read_bytes()[:20]),
     "chunk 1 of array doc is 20 bytes"),
    (lambda s: (s / "store.zarr/zarr.json").unlink(), "metadata of the store's root group is missing"),
    (lambda s: (s / "store.zarr/values/c/99").write_bytes(b"x"), "chunk 99 of array values was not written"),
], ids=["deleted-values", "deleted-doc", "flipped-byte", "truncated", "root-group", "stray-chunk"])
def test_a_damaged_datastore_is_one_line_and_verify_names_the_file(store, trained, tiny_db, tmp_path, cli, damage,
                                                                    message):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    damage(copy)
    with pytest.raises(RetroError, match=re.escape(message)):
        Datastore(copy)
    result = cli("eval", tiny_db, "--test", tiny_db, "--model", trained[0], "--knn-lm", copy, "--lambda", "0.5")
    assert result.exit_code == 2 and result.exception is None, result.output
    assert len(result.error_lines) == 1 and message in result.error_lines[0], result.output
    report = cli("verify", copy, "--json")
    assert report.exit_code == 1 and any(message in p for p in json.loads(report.stdout)["problems"]), report.output


def test_verify_takes_an_intact_datastore_and_reads_nothing_else(store, cli):
    from helpers import tree_snapshot

    before = tree_snapshot(store)
    report = cli("verify", store, "--json")
    data = json.loads(report.stdout)
    assert report.exit_code == 0 and data["ok"], report.output
    assert [(s["stage"], s["status"]) for s in data["stages"]] == [("keys", "complete"), ("index", "complete")]
    assert data["files"] > 6 and data["bytes"] > 0
    assert tree_snapshot(store) == before


@pytest.mark.parametrize("change, message", [
    (lambda m: m["counts"].update(dim=128), "'counts.dim' (128) differs from the model's d_model"),
    (lambda m: m["counts"].update(keys="many"), "'counts.keys' must be an integer"),
    (lambda m: m["stages"]["index"].update(temperature_scale=-1), "temperature_scale' must be a number in [1e-06"),
    # probe item 4: these passed, and eval divided by zero (or overflowed) into a wrong bpb at rc 0
    (lambda m: m["stages"]["index"].update(temperature_scale=1e-300), "temperature_scale' must be a number in"),
    (lambda m: m["stages"]["index"].update(temperature_scale=1e300), "temperature_scale' must be a number in"),
    (lambda m: m["stages"]["index"]["shards"][1].update(start=7), "'stages.index.shards' does not cover"),
    (lambda m: m["stages"]["keys"]["files"].pop("doc"), "'stages.keys.files' must record the arrays"),
    (lambda m: (m["model"].update(d_model=128), m["counts"].update(dim=128)), "array keys has shape"),
    (lambda m: m["db"].pop("content_id"), "older retrocli (no checksums, no DB content id); rebuild it"),
])
def test_an_edited_datastore_manifest_is_one_line_naming_the_field(store, tmp_path, cli, change, message):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    _edit(copy, change)
    with pytest.raises(RetroError, match=re.escape(message)):
        Datastore(copy)


def test_a_datastore_of_a_copy_that_took_another_change_is_refused(trained, tiny_db, tmp_path, cli):
    """Two copies of one DB, each with another document removed, are both version 2 of the same db_id."""
    x, y = tmp_path / "x", tmp_path / "y"
    shutil.copytree(tiny_db, x)
    shutil.copytree(tiny_db, y)
    assert cli("remove", x, "--doc", "0").exit_code == 0 and cli("remove", y, "--doc", "1").exit_code == 0
    assert open_db(x).version == open_db(y).version == 2
    out = build_datastore(x, trained[0], tmp_path / "store-of-x", SMALL)
    Datastore(out).check_matches(trained[0], open_db(x))
    with pytest.raises(RetroError, match="other DB content"):
        Datastore(out).check_matches(trained[0], open_db(y))
    result = cli("eval", y, "--test", tiny_db, "--model", trained[0], "--knn-lm", out, "--lambda", "0.5")
    assert result.exit_code == 2 and len(result.error_lines) == 1 and "rebuild it" in result.error_lines[0]
    with pytest.raises(RetroError, match="another model, DB content or options"):  # and not resumed as if same
        build_datastore(y, trained[0], out, SMALL)


def test_the_code_size_is_chosen_from_the_model_width_and_checked_before_any_key(store, trained, tiny_db, tmp_path):
    from retrocli.index_kinds import auto_knn_pq_bytes

    assert [auto_knn_pq_bytes(d) for d in (576, 256, 384, 200, 7)] == [96, 64, 96, 8, 1]
    with pytest.raises(RetroError, match="--pq-bytes: must divide"):
        build_datastore(tiny_db, trained[0], tmp_path / "bad", replace(SMALL, kind="ivfpq", pq_bytes=7))
    assert not (tmp_path / "bad").exists()  # refused before a key was computed
    # an hnsw store is not rebuilt for options only an ivfpq store uses
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    before = (copy / "manifest.json").read_bytes()
    assert build_datastore(tiny_db, trained[0], copy, replace(SMALL, pq_bytes=32, nprobe=8)) == copy
    assert (copy / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("temperature", ["1e-300", "1e300", "nan", "0"])
def test_a_knn_temperature_out_of_its_range_is_one_line(store, trained, tiny_db, cli, temperature):
    # probe item 4: --knn-temperature 1e-300 / 1e300 ran with RuntimeWarnings and printed a wrong bpb at rc 0
    out, _ = trained
    for args in (("eval", tiny_db, "--test", tiny_db), ("generate", "--db", tiny_db, "--prompt", "hi")):
        result = cli(*args, "--model", out, "--knn-lm", store, "--knn-temperature", temperature)
        assert result.exit_code == 2 and len(result.error_lines) == 1, result.output
        assert result.error_lines[0].startswith("error: --knn-temperature: must be in [1e-06, 1e+09]")


def test_an_ivfpq_datastore_drops_its_keys_searches_its_codes_and_evaluates(store, trained, tiny_db, small_jsonl,
                                                                              tmp_path, cli):
    from retrocli.datastore import verify_datastore
    from retrocli.eval import evaluate

    out, _ = trained
    exact = Datastore(store)
    options = DatastoreOptions(block_size=1000, shard_size=2500, threads=1, kind="ivfpq", pq_bytes=exact.dim // 4,
                               nprobe=1024)
    path = build_datastore(tiny_db, out, tmp_path / "pq", options)
    quantised = Datastore(path)
    manifest = quantised.manifest
    assert manifest["stages"]["keys"]["keys_dropped"] and not (path / "store.zarr" / "keys").exists()
    assert manifest["stages"]["index"]["kind"] == "ivfpq" and manifest["stages"]["index"]["shards"][0]["file"].endswith(
        ".faiss")
    assert quantised.disk_bytes() < exact.disk_bytes() / 2
    assert verify_datastore(path).ok
    keys = _arrays(store)["keys"].astype(np.float32)
    queries = keys[:: max(1, len(keys) // 50)]
    want, _ = exact.search(queries, 8)
    got, dists = quantised.search(queries, 8)
    assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(got, want)]) > 0.5
    assert (np.diff(dists, axis=1) >= -1e-4).all()
    narrow, _ = Datastore(path, nprobe=1).search(queries, 8)  # --knn-nprobe: this run only
    assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(narrow, want)]) < \
        np.mean([len(set(a) & set(b)) / 8 for a, b in zip(got, want)])
    with pytest.raises(RetroError, match="--knn-nprobe: applies to an ivfpq datastore"):
        Datastore(store, nprobe=4)
    banned = np.unique(quantised.docs[got[:, 0]])[:3]
    ids_x, _ = quantised.search(queries, 8, exclude_docs=banned)
    assert (ids_x >= 0).all() and not np.isin(quantised.docs[ids_x], banned).any()
    assert build_datastore(tiny_db, out, path, options) == path  # complete: nothing redone, nothing lost
    report = evaluate(tiny_db, [small_jsonl], out, work_dir=tmp_path / "w",
                      knn=KnnOptions(datastore=path, lam=0.25))
    rows = {r["method"]: r for r in report["knn_lm"]["methods"]}
    assert rows["knn_lm"]["bpb"] > 0 and rows["knn_lm"]["disk_bytes"] == quantised.disk_bytes()
    assert cli("verify", path).exit_code == 0


def test_a_model_with_sharded_weights_has_one_identity(tmp_path):
    """The bundled model ships its weights as shards: a datastore for it records one sha256 of them all."""
    from retrocli.datastore import model_identity
    from retrocli.model.checkpoint import resolve_model

    bundled = resolve_model(None)
    identity = model_identity(bundled)
    assert len(identity["sha256"]) == 64
    copy = tmp_path / "model"
    shutil.copytree(bundled, copy)
    shard = sorted(copy.glob("model-*-of-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert model_identity(copy)["sha256"] != identity["sha256"]
