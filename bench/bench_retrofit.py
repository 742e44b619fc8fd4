"""What freezing buys: a RETRO-fit training step (base frozen, only the CCA branches and the encoder learn)
against fine-tuning the whole base with the same new layers (the anchor), in the same run: tokens/s and
peak RSS of each, every mode in its own process so that its peak is its own. A third mode starts the CCA
branches later (--late-start), so that gradients cross fewer frozen layers: what that saves per step.

    .venv/bin/python bench/bench_retrofit.py [--base smollm2] [--seq-len 512] [--batch-size 1] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one_mode(args) -> dict:
    from retrocli.device import resolve_precision
    from retrocli.model.retrofit import build_retrofit

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_retrofit(args.base, 64, args.seq_len, 2, 0, vocab_size=49152 if args.base == "smollm2" else 96,
                           cca_start=args.late_start if args.mode == "late" else None)
    if args.mode == "full":
        model.base.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    precision = resolve_precision(args.precision)
    g = torch.Generator().manual_seed(1)
    vocab, L = model.config.vocab_size, args.seq_len // 64
    idx = torch.randint(1, vocab, (args.batch_size, args.seq_len), generator=g)
    targets = torch.roll(idx, -1, 1)
    neighbors = torch.randint(1, vocab, (args.batch_size, L, 2, 128), generator=g)
    seconds = 0.0
    for step in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(idx, neighbors=neighbors, targets=targets, need_logits=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # step 0 warms up
            seconds += time.perf_counter() - start
    tokens = args.batch_size * args.seq_len * args.steps
    return {"mode": args.mode, "cca_layers": list(model.config.cca_layers), "tokens_per_second": tokens / seconds,
            "seconds_per_step": seconds / args.steps,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "trainable_parameters": sum(p.numel() for p in params), "parameters": model.num_parameters(),
            "precision": precision, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--late-start", type=int, default=18, help="first CCA layer of the late mode")
    parser.add_argument("--mode", choices=["retrofit", "late", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)))
        return
    rows = {}
    for mode in ("retrofit", "late", "full"):
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:] if a != "--json"]
        rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    frozen, late, full = rows["retrofit"], rows["late"], rows["full"]
    result = {**rows, "speedup": frozen["tokens_per_second"] / full["tokens_per_second"],
              "rss_ratio": frozen["peak_rss_gib"] / full["peak_rss_gib"],
              "late_speedup": late["tokens_per_second"] / frozen["tokens_per_second"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"base {args.base}, {args.batch_size} x {args.seq_len} tokens per step, {frozen['precision']}, "
          f"{frozen['threads']} threads")
    for row in (frozen, late, full):
        print(f"  {row['mode']:9s} {row['tokens_per_second']:8.0f} tokens/s  peak RSS {row['peak_rss_gib']:.2f} GiB  "
              f"trainable {row['trainable_parameters'] / 1e6:.1f}M of {row['parameters'] / 1e6:.1f}M  "
              f"CCA after layers {row['cca_layers']}")
    print(f"retrofit / full fine-tune (anchor): {result['speedup']:.2f}x the tokens/s, "
          f"{result['rss_ratio']:.2f}x the peak RSS")
    print(f"CCA from layer {args.late_start} / the paper's (anchor): {result['late_speedup']:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
