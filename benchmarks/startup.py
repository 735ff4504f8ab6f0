"""How long `l4q` takes before it does anything: `--help` and a one-line error on a missing path.

    .venv/bin/python benchmarks/startup.py [--runs 10]

Prints a markdown table of the median and worst wall time over the runs, beside `python -c pass`
(the interpreter's own start-up, measured the same way, as the floor).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

L4Q = str(Path(sys.executable).parent / "l4q")
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "l4q --help": [L4Q, "--help"],
    "l4q quantize --model /nonexistent --to int4": [L4Q, "quantize", "--model", "/nonexistent", "--to", "int4"],
    "l4q export gguf /nonexistent": [L4Q, "export", "gguf", "/nonexistent"],
    "l4q eval --base /nonexistent --candidate x": [L4Q, "eval", "--base", "/nonexistent", "--candidate", "x"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print("| command | median s | worst s | exit |\n|---|---:|---:|---:|")
    for name, cmd in COMMANDS.items():
        times, code = [], 0
        for _ in range(args.runs):
            start = time.perf_counter()
            code = subprocess.run(cmd, capture_output=True).returncode
            times.append(time.perf_counter() - start)
        print(f"| `{name}` | {statistics.median(times):.3f} | {max(times):.3f} | {code} |")


if __name__ == "__main__":
    main()
