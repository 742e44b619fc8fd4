"""Load test of `retro serve` on this machine: requests/s and p50/p99 latency with 1, 8 and 64 concurrent
clients, each request one query chunk (POST /neighbors, k neighbours with [N, F] text and tokens). The anchor,
measured in the same run: one process calling the Python API (LocalRetriever) in a loop, one query at a
time. Bounded in requests and seconds; the server is started here on a free 127.0.0.1 port.

    .venv/bin/python bench/bench_serve.py --db bench-out/full [--clients 1,8,64] [--requests 512] \
        [--max-seconds 60] [--batch-window-ms 2]

The clients are threads of this process, on the same 2 cores as the server: the figures are a lower
bound on what a server with cores of its own does.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/neighbors", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def percentiles(latencies: list[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50)) * 1000, float(np.percentile(latencies, 99)) * 1000


def load(url: str, texts: list[str], clients: int, requests: int, max_seconds: float, k: int):
    """`requests` POSTs spread over `clients` threads (or fewer if max_seconds runs out first)."""
    latencies: list[float] = []
    lock = threading.Lock()
    next_request = iter(range(requests))
    deadline = time.perf_counter() + max_seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                number = next(next_request, None)
            if number is None:
                return
            start = time.perf_counter()
            post(url, {"texts": [texts[number % len(texts)]], "k": k})
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    return len(latencies) / wall, *percentiles(latencies), len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--requests", type=int, default=512, help="Requests per concurrency level at most")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="Seconds per concurrency level at most")
    parser.add_argument("--batch-window-ms", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from retrocli.db import open_db
    from retrocli.retriever import LocalRetriever

    db = open_db(args.db)
    rng = np.random.default_rng(args.seed)
    texts = [db.chunk_text(int(c)) for c in rng.choice(db.num_chunks, size=min(1024, db.num_chunks), replace=False)]
    texts = [t for t in texts if t.strip()]  # the server refuses a blank query (a chunk of only newlines)

    # the anchor: the Python API in a loop, one query chunk per call, in this process
    retriever = LocalRetriever(db)
    retriever.retrieve_texts(texts[:4], args.k)
    latencies = []
    start = time.perf_counter()
    for number in range(args.requests):
        if time.perf_counter() - start > args.max_seconds:
            break
        t = time.perf_counter()
        retriever.retrieve_texts([texts[number % len(texts)]], args.k)
        latencies.append(time.perf_counter() - t)
    api_rate = len(latencies) / (time.perf_counter() - start)
    api_p50, api_p99 = percentiles(latencies)
    del retriever

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "retrocli", "serve", args.db, "--port", str(port),
                               "--batch-window-ms", str(args.batch_window_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-500:]}") from None
                time.sleep(0.3)
        post(url, {"texts": texts[:4], "k": args.k})  # warm-up
        print(f"DB {db.num_chunks:,} chunks, k={args.k}, batching window {args.batch_window_ms} ms, one query chunk "
              "per request")
        print("| clients | requests | requests/s | vs API loop | p50 ms | p99 ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| API loop (anchor) | {len(latencies)} | {api_rate:.1f} | 1.00 | {api_p50:.1f} | {api_p99:.1f} |")
        for clients in (int(c) for c in args.clients.split(",")):
            before = json.loads(urllib.request.urlopen(url + "/info").read())
            rate, p50, p99, done = load(url, texts, clients, args.requests, args.max_seconds, args.k)
            after = json.loads(urllib.request.urlopen(url + "/info").read())
            per_call = (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])
            print(f"| {clients} | {done} | {rate:.1f} | {rate / api_rate:.2f} | {p50:.1f} | {p99:.1f} |"
                  f"  ({per_call:.1f} requests per embed + search call)", flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
