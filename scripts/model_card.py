"""Write the bundled model's card (README.md beside the weights) from the artifacts of
scripts/retro_6m_model.sh: the training log, the model metadata, `retro eval --json`, and greedy
`retro generate` transcripts on held-out prompts (run here, retrieving from the training DB).

    .venv/bin/python scripts/model_card.py --work retro-6m-work --model retrocli/assets/retro-6m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrocli.options import SamplingOptions

# Held-out prompts: (document id in examples/data/heldout.jsonl, first char, last char, picked). The first
# four were fixed before the model could copy; the picked two are the top of scripts/pick_demo_prompt.py on
# the full DB (the windows whose retrieved neighbours hold the next chunk and where the model copies most).
PROMPTS = [
    ("postgresql-doc-15/sql-droppublication.html", 0, 330, False),
    ("python3.11-doc/c-api/tuple.rst.txt", 0, 900, False),
    ("python3.11-doc/library/chunk.rst.txt", 0, 900, False),
    ("python-django-doc/releases/1.11.14.html", 0, 200, False),
    ("python-django-doc/releases/1.3.5.html", 1119, 1871, True),
    ("python3.11-doc/whatsnew/2.3.rst.txt", 7045, 7848, True),
]
NEW_TOKENS = 96


def cpu_description() -> str:
    """The CPU features that decide training speed, as torch sees them (the card is written where it trained)."""
    from retrocli.device import cpu_features

    f = cpu_features()
    return ", ".join([f"torch capability {f['capability']}", "AMX" if f["amx_tile"] else "no AMX",
                      "AVX512-BF16" if f["avx512_bf16"] else "no AVX512-BF16"])


def curve_table(log: list[dict], every: int = 150) -> str:
    rows = ["| steps | tokens seen | mean training loss (nats/token) |", "|---:|---:|---:|"]
    for end in range(every, log[-1]["step"] + 1, every):
        window = [r for r in log if end - every < r["step"] <= end]
        mean = sum(r["loss"] for r in window) / len(window)
        rows.append(f"| {end - every + 1}–{end} | {window[-1]['tokens_seen']:,} | {mean:.3f} |")
    return "\n".join(rows)


def bpb_table(result: dict) -> str:
    rows = ["| chunks with r(C) ≤ α | chunks | bpb with retrieval | bpb without | gain |", "|---:|---:|---:|---:|---:|"]
    for point in result["curve"]:
        if not point["chunks"]:
            continue
        gain = 1 - point["bpb"] / point["bpb_no_retrieval"]
        rows.append(f"| α = {point['alpha']:g} | {point['chunks']:,} | {point['bpb']:.4f} | "
                    f"{point['bpb_no_retrieval']:.4f} | {100 * gain:+.1f} % |")
    return "\n".join(rows)


def transcripts(db_path: Path, model: Path, heldout: Path) -> str:
    from retrocli.generate import generate

    docs = {}
    for line in heldout.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        docs[record["id"]] = record["text"]
    # another held-out set (a small rebuild of the recipe): the start of its first two pages
    prompts = [p for p in PROMPTS if p[0] in docs] or [(doc_id, 0, 600, False) for doc_id in list(docs)[:2]]
    parts = []
    for doc_id, start, stop, picked in prompts:
        prompt = docs[doc_id][start:stop]
        with_retrieval = generate(
            db_path, prompt, model, sampling=SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0),
        )
        without = generate(
            db_path, prompt, model, retrieval=False,
            sampling=SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0),
        )
        sources = sorted({nb.source for rec in with_retrieval.retrievals for nb in rec.neighbors})
        copy = with_retrieval.copy
        shared = (f"longest run shared with a retrieved chunk: **{copy.tokens} tokens** from `{copy.source}`: "
                  f"`{' '.join(copy.text.split())}`") if copy else "no run shared with retrieved chunks"
        listed = ", ".join(f"`{s}`" for s in sources[:4]) + (", …" if len(sources) > 4 else "")
        parts.append(
            f"**`{doc_id}`**{' (picked: its neighbours hold the next chunk)' if picked else ''}, "
            f"characters {start}–{stop} as the prompt (ending: "
            f"`…{' '.join(prompt[-120:].split())}`); {len(with_retrieval.retrievals)} retrievals from "
            f"{len(sources)} DB pages ({listed}).\n\n"
            f"With retrieval:\n\n```text\n{with_retrieval.text.strip()}\n```\n\n{shared}.\n\n"
            f"Without retrieval (same model, `--no-retrieval`):\n\n```text\n{without.text.strip()}\n```\n"
        )
    return "\n".join(parts)


def neighbour_ablation(db, neighbor_ids, model_dir: Path, batches: int = 4) -> dict[str, float]:
    """Training loss on the same sequences with the retrieved neighbours, with none (masked), with another
    sequence's neighbours, and with an oracle (each chunk's own [C_u, C_u+1]: the answer is in them)."""
    import numpy as np
    import torch

    from retrocli.model.checkpoint import load_model
    from retrocli.sequences import neighbor_rows
    from retrocli.train import TrainingData

    model, _ = load_model(model_dir, db)  # a RETRO decoder or a retrofit
    data = TrainingData(db, neighbor_ids, model.config.seq_len, model.config.num_neighbors, set())
    losses: dict[str, list[float]] = {"retrieved": [], "none": [], "shuffled": [], "oracle": []}
    for step in range(batches):
        idx, targets, neighbors, real = data.batch(seed=123, step=step, batch_size=4)
        rows = data.batch_rows(seed=123, step=step, batch_size=4)
        oracle_ids = np.stack([rows] + [np.full_like(rows, -1)] * (neighbors.shape[2] - 1), axis=-1)
        variants = {"retrieved": neighbors, "none": torch.full_like(neighbors, data.pad),
                    "shuffled": neighbors[torch.arange(len(idx)).roll(1)],
                    "oracle": torch.from_numpy(neighbor_rows(db, oracle_ids, data.pad, data.tokens, data.lengths))}
        with torch.no_grad():
            for name, value in variants.items():
                losses[name].append(float(model(idx, neighbors=value, targets=targets, token_mask=real)[1]))
    return {name: sum(v) / len(v) for name, v in losses.items()}


def ablation_table(models: dict[str, dict[str, float]]) -> str:
    """One column per model, one row per kind of neighbours, and how much the oracle lowers each loss."""
    names = list(models)
    rows = ["| neighbours given | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for kind in next(iter(models.values())):
        rows.append(f"| {kind} | " + " | ".join(f"{models[n][kind]:.4f}" for n in names) + " |")
    rows.append("| oracle vs none | " + " | ".join(
        f"{100 * (1 - models[n]['oracle'] / models[n]['none']):+.1f} %" for n in names) + " |")
    return "\n".join(rows)


def run_description(number: int, title: str, state: dict, k: int, init: str = "") -> str:
    """One training run as the checkpoint recorded it (the options of its last leg)."""
    o = state["options"]
    config = Path(o["config"]).name if o["config"].endswith(".json") else o["config"]
    sampling = f", `--retrieval-focus {o['retrieval_focus']:g}`" if o.get("retrieval_focus") else ""
    sampling += f", `--window-exclusion {o['window_exclusion']}`" if o.get("window_exclusion", "all") != "all" else ""
    sampling += f", `--copy-curriculum {o['copy_curriculum']:g}`" if o.get("copy_curriculum") else ""
    return (f"{number}. **{title}** (`scripts/{config}`){init}: {state['step']:,} steps of {o['batch_size']} "
            f"sequences × {o['seq_len']} tokens, k = {k} neighbours per chunk, AdamW (lr {o['lr']:g}, "
            f"{o['warmup']} warmup steps, cosine to {100 * o['min_lr_ratio']:g} %, weight decay "
            f"{o['weight_decay']:g} on matrices, clip {o['grad_clip']:g}), seed {o['seed']}{sampling}: "
            f"{state['tokens_seen']:,} tokens in {state['seconds'] / 60:.0f} minutes.")


def curriculum_note(share: float) -> str:
    """What `--copy-curriculum` changed in the copy head's run (nothing when it was off)."""
    if not share:
        return ""
    return (f" The one exception is run 2's copy curriculum (`--copy-curriculum {share:g}`): for "
            f"{100 * share:g} % of its chunks, drawn at random, the first neighbour is replaced by a damaged copy "
            "of the chunk's own `[C_u, C_u+1]` (shifted by up to 32 tokens, 10 % of its tokens replaced at "
            "random), so that the copy head also sees neighbours that hold the text to predict, as a page just "
            "added to the DB does. The other neighbours stay real, and evaluation never uses such copies.")


def ceiling_split(ceiling: dict) -> str:
    """Where the model's own gain comes from: the copyable tokens or the rest (older ceiling files lack it)."""
    own = next((c for c in ceiling["ceilings"] if c["k"] == ceiling.get("model_k") and "gain_on_copyable" in c), None)
    if own is None:
        return ""
    return (f" It bounds copies of 5-token runs, not retrieval as a whole. Fed its own k = {own['k']}, this model "
            f"saves {100 * own['gain_on_copyable']:.2f} % of its no-retrieval bits on the copyable tokens (which "
            f"hold {100 * own['copyable_bits']:.2f} %) and {100 * own['gain_elsewhere']:.2f} % on the other "
            "tokens: shorter matches and neighbours that make a token likelier without a copy also help.")


def k_table(evaluations: dict[int, dict], max_gain: dict[int, float], trained_k: int) -> str:
    rows = ["| neighbours fed (`--k`) | bpb with retrieval | bpb without | gain | copy ceiling (5-token copies) | "
            "share of the ceiling reached |", "|---:|---:|---:|---:|---:|---:|"]
    for k, result in sorted(evaluations.items()):
        gain = result["retrieval_gain"]
        label = f"{k} (fine-tuned with, the default)" if k == trained_k else str(k)
        ceiling = max_gain.get(k)
        reached = f"{100 * gain / ceiling:.0f} %" if ceiling else "–"
        measured = f"{100 * ceiling:.2f} % | {reached}" if ceiling is not None else "– | –"
        rows.append(f"| {label} | **{result['bpb_retrieval']:.4f}** | {result['bpb_no_retrieval']:.4f} | "
                    f"**{100 * gain:+.2f} %** | {measured} |")
    return "\n".join(rows)


def index_note(index: dict) -> str:
    """The DB's index as the card describes it: HNSW by default, or IVF-PQ codes re-ranked exactly."""
    if index.get("kind", "hnsw") == "hnsw":
        return f"HNSW (hnswlib, M={index['M']}, ef_construction {index['ef_construction']})"
    factory = index.get("trained", {}).get("factory", "IVF-PQ")
    return (f"IVF-PQ (faiss, {factory}, nprobe {index['nprobe']}, the top {index['rerank']} candidates "
            "re-ranked by exact distance)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bundled-work", type=Path)
    parser.add_argument("--model", default=Path("retrocli/assets/retro-6m"), type=Path)
    parser.add_argument("--heldout", default=Path("examples/data/heldout.jsonl"), type=Path)
    args = parser.parse_args()

    from retrocli.db import open_db
    from retrocli.model import RetroConfig
    from retrocli.neighbor_arrays import open_neighbors

    # Two legs: the base decoder (work/base), then the copy head fine-tuned from it (work/model). A resumed
    # run re-logs the steps after its checkpoint: keep the last record of each step.
    def read_log(model_dir: Path, offset: int = 0) -> list[dict]:
        records = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
        by_step = {r["step"]: r for r in records}
        return [{**r, "step": r["step"] + offset} for _, r in sorted(by_step.items())]

    meta = json.loads((args.model / "retrocli_model.json").read_text())
    config = json.loads((args.model / "config.json").read_text())
    base_state = json.loads((args.work / "base" / "checkpoint" / "state.json").read_text())
    state = json.loads((args.work / "model" / "checkpoint" / "state.json").read_text())
    base_log = read_log(args.work / "base")
    log = base_log + [{**r, "tokens_seen": r["tokens_seen"] + base_state["tokens_seen"]}
                      for r in read_log(args.model, offset=base_state["step"])]
    total_tokens = base_state["tokens_seen"] + meta["tokens_seen"]
    total_seconds = base_state["seconds"] + state["seconds"]
    result = json.loads((args.work / "eval.json").read_text())
    trained_k = config["num_neighbors"]
    evaluations = {result["num_neighbors"]: result}
    for other in sorted(args.work.glob("eval-k*.json")):  # the same model fed another k
        extra = json.loads(other.read_text())
        evaluations.setdefault(extra["num_neighbors"], extra)
    ceiling = json.loads((args.work / "ceiling.json").read_text())  # bench/bench_retrieval_ceiling.py --json
    max_gain = {c["k"]: c["max_gain"] for c in ceiling["ceilings"]}
    db, nb = open_db(args.work / "db"), open_neighbors(args.work / "db-neighbors")
    manifest = db.manifest
    counts, embedder, index = manifest["counts"], manifest["embedder"], manifest["index"]
    db_seconds = sum(manifest["stages"][stage]["seconds"] for stage in ("chunk", "embed", "index"))
    at_alpha = next(p for p in result["curve"] if p["alpha"] == 0.125)
    gain_alpha = 1 - at_alpha["bpb"] / at_alpha["bpb_no_retrieval"]
    at_half = next(p for p in result["curve"] if p["alpha"] == 0.5)
    size_mb = sum(p.stat().st_size for p in args.model.iterdir() if p.is_file() and p.name != "README.md") / 1e6
    base_k = json.loads((args.work / "base" / "config.json").read_text())["num_neighbors"]
    runs = "\n".join([
        run_description(1, "Base decoder, no copy head", base_state, base_k),
        run_description(2, "Copy head", state, trained_k,
                        init=", `--init-from` the base (the copy head starts fresh), every weight trained"),
    ])
    ablation = {"base decoder (run 1)": neighbour_ablation(db, nb.ids, args.work / "base"),
                "shipped model (run 2)": neighbour_ablation(db, nb.ids, args.model)}
    template = (Path(__file__).with_name("model_card_template.md")).read_text(encoding="utf-8")
    card = template.format(
        parameters=f"{meta['parameters']:,}",
        size_mb=f"{size_mb:.1f}",
        config=json.dumps({k: config[k] for k in ("n_layer", "n_head", "d_model", "d_ff", "cca_layers", "enc_layers",
                                                  "enc_d_model", "num_neighbors", "chunk_size", "seq_len",
                                                  "vocab_size", "copy_head", "copy_bigram", "copy_trigram",
                                                  "copy_sink_margin", "copy_match_run")
                           if k in config}),
        neighbor_len=config["neighbor_len"],
        sink_margin=config.get("copy_sink_margin", RetroConfig.copy_sink_margin),  # older configs lack it
        match_run_note=(f" It also scores how many tokens, up to {config['copy_match_run']}, each neighbour spot "
                        "shares with the text just read (`copy_match_run`; a learned score per length, starting "
                        "at one logit per token beyond the bigram), so the spot that continues the copy so far "
                        "wins over others sharing only the last two tokens." if config.get("copy_match_run") else ""),
        curriculum=curriculum_note(state["options"].get("copy_curriculum", 0)),
        curriculum_ref=" (but for its copy curriculum, above)" if state["options"].get("copy_curriculum") else "",
        vocab_size=f"{config['vocab_size']:,}",
        embedder=embedder["name"],
        pooling=embedder["pooling"],
        embedding_dim=embedder["dim"],
        embed_precision=embedder.get("precision", "fp32"),
        index_note=index_note(index),
        k=trained_k,
        neighbors_k=nb.manifest["settings"]["k"],
        precision=meta["precision"],
        cpu_capability=cpu_description(),
        threads=state["options"]["threads"] or "torch's default number of",
        requested_precision=state["options"]["precision"],
        eval_ks=" and ".join(str(k) for k in sorted(evaluations)),
        ceiling_ks=" ".join(str(k) for k in max_gain),
        db_minutes=f"{db_seconds / 60:.0f}",
        runs=runs,
        total_tokens=f"{total_tokens:,}",
        total_minutes=f"{total_seconds / 60:.0f}",
        epochs=f"{total_tokens / counts['tokens']:.2f}",
        db_documents=f"{counts['documents']:,}",
        db_chunks=f"{counts['chunks']:,}",
        db_tokens=f"{counts['tokens'] / 1e6:.2f}M",
        tokens_per_second=f"{total_tokens / total_seconds:.0f}",
        final_loss=f"{sum(r['loss'] for r in log[-10:]) / len(log[-10:]):.3f}",
        curve=curve_table(log),
        test_documents=result["test_documents"],
        test_chunks=f"{result['test_chunks']:,}",
        test_bytes=f"{result['test_bytes']:,}",
        k_table=k_table(evaluations, max_gain, trained_k),
        ceiling_k10=f"{100 * max_gain[10]:.1f}" if 10 in max_gain else "not measured",
        ceiling_split=ceiling_split(ceiling),
        gain_alpha=f"{100 * gain_alpha:+.1f}",
        alpha_chunks=f"{at_alpha['chunks']:,}",
        leaky_share=f"{100 * (1 - at_half['chunks'] / result['test_chunks']):.1f}",
        bpb_table=bpb_table(result),
        ablation=ablation_table(ablation),
        new_tokens=NEW_TOKENS,
        transcripts=transcripts(args.work / "db", args.model, args.heldout),
    )
    card = card.replace(str(Path.cwd()) + "/", "")  # sources relative to the repository
    (args.model / "README.md").write_text(card, encoding="utf-8")
    print(f"model card → {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
