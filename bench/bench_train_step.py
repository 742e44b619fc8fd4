"""What masking padding costs in training: a forward + backward step of the `small` (or --config) model on
real training batches with the padding mask (what `retro train` does) against the same step without it
(the anchor, the fused causal kernel), measured in this run.

    .venv/bin/python bench/bench_train_step.py --db DB --neighbors NB [--steps 10] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--neighbors", required=True)
    parser.add_argument("--config", default="small")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from retrocli.db import open_db
    from retrocli.model import RetroModel
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.train import TrainingData, build_config

    db = open_db(args.db)
    data = TrainingData(db, open_neighbors(args.neighbors).ids, args.seq_len, 2, set())
    torch.manual_seed(0)
    model = RetroModel(build_config(args.config, db.tokenizer.vocab_size, db.chunk_size, args.seq_len, 2, data.pad))
    batches = [data.batch(0, step, args.batch_size) for step in range(args.steps + 1)]
    padded = sum(int((~real).sum()) for *_, real in batches) / sum(real.numel() for *_, real in batches)

    def run(masked: bool) -> float:
        seconds = 0.0
        for step, (idx, targets, neighbors, real) in enumerate(batches):
            start = time.perf_counter()
            _, loss = model(idx, neighbors=neighbors, targets=targets, need_logits=False,
                            token_mask=real if masked else None)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step:  # step 0 warms up
                seconds += time.perf_counter() - start
        return seconds / args.steps

    anchor, masked = run(False), run(True)
    tokens = args.batch_size * args.seq_len
    print(f"{args.config} model, {args.batch_size} x {args.seq_len} tokens, {padded:.1%} padding, "
          f"{torch.get_num_threads()} threads")
    print(f"with the padding mask: {masked:.3f} s/step ({tokens / masked:,.0f} tokens/s); anchor (no mask): "
          f"{anchor:.3f} s/step ({tokens / anchor:,.0f} tokens/s); ratio {masked / anchor:.2f}")


if __name__ == "__main__":
    main()
