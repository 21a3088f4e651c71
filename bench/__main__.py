"""Every benchmark in turn, sized to finish together in under 15 minutes on this 2-core machine.

Each runs as its own process (no torch threads or memory shared between them)
and prints its own tables; a summary of every JSON line follows, then one JSON
object with all of them as the last line.

    .venv/bin/python -m bench
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import load1, print_table

PLAN: tuple[tuple[str, list[str]], ...] = (
    ("ingest", ["--n", "60", "--rounds", "3"]),  # the median of three rounds: this VM's disk speed wanders
    ("inference", ["--n", "8"]),
    ("encode", ["--n", "7"]),
    ("viewer", ["--n", "3"]),
    ("e2e", ["--n", "5"]),
    ("retrieval", ["--n", "5000"]),
    ("sustained", ["--m", "120"]),
    ("sustained", ["--m", "24", "--workers", "1", "2", "3"]),
)


def run(module: str, args: list[str]) -> tuple[dict, float]:
    """Run `python -m bench.MODULE ARGS`, echoing its output; its last line parsed as JSON, and its seconds."""
    print(f"\n=== bench.{module} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", f"bench.{module}", *args], stdout=subprocess.PIPE, text=True)
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        last = line if line.strip() else last
    if process.wait() != 0:
        raise SystemExit(f"bench.{module} failed with exit status {process.returncode}")
    return json.loads(last), time.perf_counter() - start


def main() -> int:
    results = []
    for module, args in PLAN:
        result, seconds = run(module, args)
        results.append({**result, "seconds": round(seconds)})
    print("\n=== summary")
    print_table(["bench", "args", "s", "figures"], [
        [r["bench"], " ".join(args), r["seconds"],
         ", ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, (int, float)) and k != "seconds")[:150]]
        for r, (_, args) in zip(results, PLAN)])
    print(json.dumps({"bench": "all", "seconds": sum(r["seconds"] for r in results), "results": results,
                      "load1": load1()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
