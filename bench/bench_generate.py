"""Generation speed: tokens/s with and without retrieval, retrieval cost per chunk (ms and share of
generation time), and KV-cached decoding vs recomputing the whole window every token (what
RETRO-pytorch's generate does) — the anchor, measured in the same run. For a retrofit the anchor is its
base alone through transformers' own `generate` (greedy, its KV cache). With --stale, also fresh vs stale
retrieval (`--stale-retrieval`), here and (with --serve) through a `retro serve` started on 127.0.0.1.

    .venv/bin/python bench/bench_generate.py --db DB --model MODEL_DIR [--new-tokens 512] [--stale [--serve]]
"""

from __future__ import annotations

import argparse
import time

import torch

from retrocli.options import SamplingOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--stale", action="store_true", help="Also time fresh vs stale retrieval")
    parser.add_argument("--serve", action="store_true", help="With --stale: also through a retro serve server")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from retrocli.db import open_db
    from retrocli.embed import db_embedder
    from retrocli.generate import generate
    from retrocli.index import ShardedIndex
    from retrocli.model.checkpoint import load_model
    from retrocli.sequences import neighbor_rows, pad_id

    db = open_db(args.db)
    model, _ = load_model(args.model, db)
    prompt = db.document_text(0)[:400]
    n = args.new_tokens

    start = time.perf_counter()
    plain = generate(
        db, prompt, args.model, retrieval=False, sampling=SamplingOptions(max_new_tokens=n, temperature=0),
    )
    t_plain = time.perf_counter() - start

    retrieval_seconds = []
    index, embedder = ShardedIndex(db), db_embedder(db)
    embedder.embed(["warm-up"])
    start = time.perf_counter()
    with_retrieval = generate(
        db, prompt, args.model, on_retrieval=lambda rec: None,
        sampling=SamplingOptions(max_new_tokens=n, temperature=0),
    )
    t_retr = time.perf_counter() - start
    # time the retrieval step alone on the same chunks: embed + search + [N, F] tokens
    for rec in with_retrieval.retrievals:
        s = time.perf_counter()
        ids, _ = index.search(embedder.embed([rec.chunk_text]), model.config.num_neighbors)
        neighbor_rows(db, ids[0], pad_id(db))
        retrieval_seconds.append(time.perf_counter() - s)
    per_chunk_ms = 1000 * sum(retrieval_seconds) / max(1, len(retrieval_seconds))

    prompt_ids = torch.tensor(db.tokenizer.encode_batch([prompt])[0])
    print(f"model: {model.num_parameters() / 1e6:.1f}M params, seq_len {model.config.seq_len}, "
          f"k={model.config.num_neighbors}; prompt {len(prompt_ids)} tokens, {n} new tokens, greedy")
    print(f"generate without retrieval: {n / t_plain:6.1f} tokens/s")
    print(f"generate with retrieval:    {n / t_retr:6.1f} tokens/s  ({len(with_retrieval.retrievals)} retrievals)")
    print(f"retrieval per chunk: {per_chunk_ms:.1f} ms (embed + HNSW search + [N, F] tokens); "
          f"{100 * sum(retrieval_seconds) / t_retr:.0f}% of generation time with retrieval")
    if hasattr(model, "base_info"):
        base_alone(model, prompt_ids, n, plain.seconds, with_retrieval.seconds, plain.token_ids)
    else:
        cache_vs_recompute(model, prompt_ids, n)
    print(f"text differs with retrieval vs without: {plain.text != with_retrieval.text}")
    if args.stale:
        stale_comparison(args, db, prompt, n, plain.seconds)


def base_alone(model, prompt_ids, n: int, t_plain: float, t_retr: float, plain_ids: list[int]) -> None:
    """The anchor for a retrofit: its frozen base through transformers' generate, greedy, to n new tokens.
    t_plain and t_retr are the retrofit's decoding seconds (model loading left out)."""
    ids = prompt_ids[None]
    model.base.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)
    t_hf = time.perf_counter() - start
    theirs = out[0, ids.shape[1]:].tolist()
    same = next((i for i, (a, b) in enumerate(zip(theirs, plain_ids)) if a != b), min(len(theirs), len(plain_ids)))
    print(f"the base alone through transformers' generate (anchor): {n / t_hf:.1f} tokens/s; decoding only, the "
          f"retrofit runs at {t_hf / t_plain:.2f}x its speed without retrieval ({n / t_plain:.1f} tokens/s) and "
          f"{t_hf / t_retr:.2f}x with it ({n / t_retr:.1f}); the first {same} greedy tokens equal the retrofit's "
          "without retrieval")


def cache_vs_recompute(model, prompt_ids, n: int) -> None:
    start = time.perf_counter()
    cached = model.generate(prompt_ids, n, None, temperature=0, use_cache=True)
    t_cached = time.perf_counter() - start
    start = time.perf_counter()
    full = model.generate(prompt_ids, n, None, temperature=0, use_cache=False)
    t_full = time.perf_counter() - start

    print(f"KV cache vs full recomputation per token (anchor, no retrieval): {n / t_cached:.1f} vs "
          f"{n / t_full:.1f} tokens/s, ratio {t_full / t_cached:.1f}; same tokens: {torch.equal(cached, full)}")


def stale_comparison(args, db, prompt: str, n: int, t_plain: float) -> None:
    """tokens/s and time spent waiting for retrieval, fresh vs stale, locally and through a server."""
    import json
    import socket
    import subprocess
    import sys
    import urllib.request

    from retrocli.generate import generate
    from retrocli.retriever import LocalRetriever

    def run(label: str, retriever, stale: bool) -> None:
        out = generate(
            None, prompt, args.model, retriever=retriever, stale_retrieval=stale,
            sampling=SamplingOptions(max_new_tokens=n, temperature=0),
        )
        took = out.seconds  # from the first prompt token to the last token: model loading left out
        print(f"{label:34s} {n / took:6.1f} tokens/s ({n / took / (n / t_plain):.2f}x no retrieval); decoding "
              f"waited {out.retrieval_wait_seconds:.2f} s for {len(out.retrievals)} retrievals", flush=True)

    local = LocalRetriever(db)
    local.retrieve_texts(["warm-up"], 2)
    print(f"\nfresh vs stale retrieval (greedy, same prompt; the texts differ, the token count does not; "
          f"no retrieval: {n / t_plain:.1f} tokens/s, decoding only):")
    run("here, fresh", local, False)
    run("here, stale", local, True)
    if not args.serve:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "retrocli", "serve", args.db, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                json.loads(urllib.request.urlopen(url + "/health", timeout=2).read())
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.3)
        run("through retro serve, fresh", url, False)
        run("through retro serve, stale", url, True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
