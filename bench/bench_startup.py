"""What the reading commands cost to start: `retro info DB` and `retro verify DB` as whole processes,
against `retro --help` (the anchor: Python, typer and the CLI, nothing else), best of N, in this run.
`--source DIR` runs the retrocli found there instead (to compare two checkouts on one machine).

    .venv/bin/python bench/bench_startup.py --db DB [--repeats 5] [--source DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def best_of(repeats: int, command: list[str], env: dict) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", help="a retrocli checkout to import instead of the installed one")
    args = parser.parse_args()

    env = dict(os.environ, NO_COLOR="1")
    if args.source:
        env["PYTHONPATH"] = args.source
    retro = [sys.executable, "-m", "retrocli"]
    anchor = best_of(args.repeats, [*retro, "--help"], env)
    print(f"retro --help (anchor): {anchor:.2f} s")
    for name in ("info", "verify"):
        seconds = best_of(args.repeats, [*retro, name, args.db], env)
        print(f"retro {name}: {seconds:.2f} s, {seconds / anchor:.2f}× the anchor")
    probe = "import sys, retrocli.cli, retrocli.info, retrocli.verify; print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    print(f"torch imported by info/verify: {loaded.stdout.strip()}")


if __name__ == "__main__":
    main()
