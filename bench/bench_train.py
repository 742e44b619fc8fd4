"""Training throughput of `retro train` by precision and torch.compile, against fp32 eager measured in this run.

Each variant trains the same config on the same batches for --steps steps through the real train() (AdamW,
clipping, one checkpoint at the end). Its rate is the median of the per-step tokens/s after the first two
steps, so compile time and warm-up are left out (they are printed apart). Model FLOPs per token come from
torch's FLOP counter; MFU is printed where the device's peak is known (GPUs).

    .venv/bin/python bench/bench_train.py --db DB --neighbors NB [--config scripts/bundled-model-config.json]
        [--seq-len 2048] [--batch-size 4] [--steps 8] [--device auto] [--variants fp32 auto auto+compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--neighbors", required=True)
    parser.add_argument("--config", default="scripts/bundled-model-config.json")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=["fp32", "auto", "auto+compile"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from retrocli.device import cpu_features, resolve_device
    from retrocli.train import TrainOptions, train

    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="retro-bench-train-") as tmp:
        for variant in args.variants:
            precision, _, extra = variant.partition("+")
            opts = TrainOptions(config=args.config, seq_len=args.seq_len, batch_size=args.batch_size,
                                steps=args.steps, warmup=2, log_every=1, checkpoint_every=args.steps,
                                precision=precision, threads=args.threads, compile=extra == "compile")
            started = time.perf_counter()
            summary = train(args.db, args.neighbors, Path(tmp) / variant, opts, device=args.device)
            wall = time.perf_counter() - started
            log = [json.loads(line) for line in (Path(tmp) / variant / "train_log.jsonl").read_text().splitlines()]
            steady = statistics.median(r["tokens_per_second"] for r in log[2:]) if len(log) > 2 else float("nan")
            rows.append({"variant": variant, "precision": summary["precision"], "tokens_per_second": steady,
                         # the run's wall time less its steady steps: start-up, compile, the first two steps
                         "first_two_steps_s": round(wall - (args.steps - 2) * summary["tokens_seen"] / args.steps
                                                    / max(steady, 1e-9), 1),
                         "wall_s": round(wall, 1), "final_loss": round(summary["final_loss"], 4),
                         "flops_per_token": summary["flops_per_token"],
                         "model_tflops_per_second": (summary["flops_per_token"] or 0) * steady / 1e12,
                         "mfu": summary["mfu"] and summary["mfu"] * steady / summary["tokens_per_second"]})
    anchor = next((r for r in rows if r["variant"] == "fp32"), rows[0])
    for row in rows:
        row["ratio_vs_anchor"] = row["tokens_per_second"] / anchor["tokens_per_second"]
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                           f" ({torch.get_num_threads()} threads, {cpu_features()})")
    if args.json:
        print(json.dumps({"device": where, "config": args.config, "anchor": anchor["variant"], "rows": rows}))
        return
    print(f"{args.config}, {args.batch_size} x {args.seq_len} tokens per step, {args.steps} steps, on {where}")
    print(f"anchor: {anchor['variant']} eager")
    for row in rows:
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] else ""
        print(f"{row['variant']:>14} ({row['precision']}): {row['tokens_per_second']:8,.0f} tokens/s "
              f"ratio {row['ratio_vs_anchor']:.2f}; {row['model_tflops_per_second']:.3f} model TFLOP/s{mfu}; "
              f"first two steps incl. compile ≈ {row['first_two_steps_s']} s; final loss {row['final_loss']}")


if __name__ == "__main__":
    main()
