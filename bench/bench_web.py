"""What the page's streaming costs, and whether search waits for generation, on this machine.

1. Generation over server-sent events (POST /generate, what the page reads) against the anchor, the same
   greedy generation through the Python API (retrocli.generate.generate) in this process with the same
   model loaded: time to the first streamed text, and tokens/s, as ratios.
2. POST /neighbors latency (one query chunk) while the server is idle, and while a long generation streams
   on it: the ratio shows that a search does not queue behind generation (they share the machine's cores).

The server is started here on a free 127.0.0.1 port (`retro serve DB`, its bundled model by default).

    .venv/bin/python bench/bench_web.py --db demo-out/db [--model M] [--tokens 128] [--runs 3] [--queries 40]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
from bench_serve import free_port  # the same directory: run as bench/bench_web.py


def post(url: str, route: str, body: dict) -> dict:
    request = urllib.request.Request(url + route, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def stream(port: int, body: dict) -> tuple[float, float, int]:
    """(seconds to the first text event, seconds to done, tokens) of one streamed generation."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json",
                                                         "Accept": "text/event-stream"})
    response = conn.getresponse()
    first = None
    event = None
    while True:
        line = response.readline().decode()
        if not line:
            raise RuntimeError("the stream ended without a done event")
        if line.startswith("event: "):
            event = line[7:].strip()
            if event == "text" and first is None:
                first = time.perf_counter() - start
        elif line.startswith("data: ") and event == "done":
            done = json.loads(line[6:])
            conn.close()
            return first, time.perf_counter() - start, done["tokens"]
        elif line.startswith("data: ") and event == "error":
            raise RuntimeError(json.loads(line[6:])["error"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="demo-out/db")
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args()

    import torch

    from retrocli.db import open_db
    from retrocli.generate import generate
    from retrocli.model.checkpoint import load_model
    from retrocli.options import SamplingOptions
    from retrocli.retriever import LocalRetriever

    torch.set_num_threads(1)  # the server below runs with --threads 1 too: the same cores for both
    db = open_db(args.db)
    ids = [int(t) for c in db.doc_chunks(0) for t in db.chunk_tokens(c)]
    prompt = db.tokenizer.decode(ids[:100])
    body = {"prompt": prompt, "max_new_tokens": args.tokens, "temperature": 0}
    print(f"machine: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s); "
          f"DB {db.path.name} ({db.num_chunks:,} chunks); {args.tokens} new tokens, greedy")

    # the anchor: the Python API, model and retriever loaded once, first text and total time per run
    loaded = load_model(args.model, db)
    retriever = LocalRetriever(db)
    local_first, local_total = [], []

    def timed_run() -> tuple[float, float]:
        marks: list[float] = []
        start = time.perf_counter()
        generate(None, prompt, sampling=SamplingOptions(max_new_tokens=args.tokens, temperature=0),
                 retriever=retriever, loaded=loaded, device="cpu",
                 on_text=lambda _text: marks.append(time.perf_counter() - start) if not marks else None)
        return marks[0], time.perf_counter() - start

    for _ in range(args.runs + 1):  # the first run warms up
        first, total = timed_run()
        local_first.append(first)
        local_total.append(total)
    local_first, local_total = local_first[1:], local_total[1:]

    port = free_port()
    command = [sys.executable, "-m", "retrocli", "serve", args.db, "--port", str(port), "--threads", "1"]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(server.stderr.read().decode()) from None
                time.sleep(0.5)
        runs = [stream(port, body) for _ in range(args.runs + 1)][1:]
        sse_first = [r[0] for r in runs]
        sse_total = [r[1] for r in runs]
        tokens = runs[0][2]

        queries = [db.tokenizer.decode([int(t) for t in db.chunk_tokens(c)]) for c in range(0, db.num_chunks, 7)]
        queries = queries[: args.queries]

        def latencies() -> list[float]:
            out = []
            for text in queries:
                start = time.perf_counter()
                post(url, "/neighbors", {"texts": [text], "k": 4})
                out.append(time.perf_counter() - start)
            return out

        idle = latencies()
        long_body = {**body, "max_new_tokens": 1024}
        generating = threading.Thread(target=stream, args=(port, long_body))
        generating.start()
        time.sleep(1.0)  # let the generation get going
        busy = latencies()
        busy_done = generating.is_alive()  # still generating after the queries: they ran beside it
        generating.join()
    finally:
        server.terminate()
        server.wait(30)

    med = np.median
    print(f"\nstreamed generation vs the Python API (median of {args.runs} runs, {tokens} tokens)")
    print(f"  first text:  SSE {med(sse_first) * 1000:7.0f} ms   API {med(local_first) * 1000:7.0f} ms   "
          f"ratio {med(sse_first) / med(local_first):.2f}×")
    print(f"  tokens/s:    SSE {tokens / med(sse_total):7.1f}      API {tokens / med(local_total):7.1f}      "
          f"ratio {med(local_total) / med(sse_total):.2f}×")
    print(f"\nPOST /neighbors, one chunk, k=4 ({len(queries)} queries one after another)")
    print(f"  idle:                 p50 {med(idle) * 1000:6.1f} ms  p90 {np.percentile(idle, 90) * 1000:6.1f} ms")
    print(f"  beside a generation:  p50 {med(busy) * 1000:6.1f} ms  p90 {np.percentile(busy, 90) * 1000:6.1f} ms"
          f"   ratio p50 {med(busy) / med(idle):.2f}×  (generation still running at the end: {busy_done})")


if __name__ == "__main__":
    main()
