"""What the copy head costs: training steps/s of a config with `"copy_head": true` against the same config
without it (the anchor), on the same batches, measured in the same run, interleaved so that drift in the
machine's speed hits both alike. Also times a held-out-style forward with the full mixed distribution
(what `retro eval` and generation compute) against the plain forward.

    .venv/bin/python bench/bench_copy_head.py --db DB --neighbors DB-NEIGHBORS \
        --config scripts/bundled-model-config.json [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--neighbors", required=True)
    parser.add_argument("--config", required=True, help="config.json (its copy_head is overridden)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from retrocli.db import open_db
    from retrocli.model import RetroModel
    from retrocli.neighbor_arrays import open_neighbors
    from retrocli.sequences import pad_id
    from retrocli.train import TrainingData, build_config

    db = open_db(args.db)
    config = build_config(args.config, db.tokenizer.vocab_size, db.chunk_size, 512, 2, pad_id(db))
    models = {}
    for name, copy_head in (("plain", False), ("copy head", True)):
        torch.manual_seed(0)
        model = RetroModel(dataclasses.replace(config, copy_head=copy_head)).train()
        models[name] = (model, model.configure_optimizer(0.1, 1e-3))
    data = TrainingData(db, open_neighbors(args.neighbors).ids, config.seq_len, config.num_neighbors, set())

    train_seconds = {name: 0.0 for name in models}
    eval_seconds = {name: 0.0 for name in models}
    tokens = 0
    for step in range(args.steps + 1):  # step 0 warms up and is not timed
        idx, targets, neighbors, real = data.batch(0, step, args.batch_size)
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            _, loss = model(idx, neighbors=neighbors, targets=targets, need_logits=False, token_mask=real)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                model(idx, neighbors=neighbors)
            if step:
                train_seconds[name] += elapsed
                eval_seconds[name] += time.perf_counter() - start
        if step:
            tokens += int((targets >= 0).sum())

    params = {name: model.num_parameters() for name, (model, _) in models.items()}
    print(f"config {args.config}: {args.steps} steps x {args.batch_size} x {config.seq_len} tokens, "
          f"{args.threads} threads, k={config.num_neighbors}")
    for name in models:
        print(f"{name:>10}: {params[name]:,} params; train {tokens / train_seconds[name]:7.0f} tokens/s; "
              f"forward with full distribution {tokens / eval_seconds[name]:7.0f} tokens/s")
    print(f"copy head / plain (anchor): train time x{train_seconds['copy head'] / train_seconds['plain']:.3f}, "
          f"forward time x{eval_seconds['copy head'] / eval_seconds['plain']:.3f}")


if __name__ == "__main__":
    main()
