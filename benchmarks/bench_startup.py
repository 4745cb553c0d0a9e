"""How fast the command line answers: `--help` of every command and an argument error.

Each command is started as a fresh process `--repeats` times, interleaved with
the baseline `python -c "import click"`; the figure is the ratio of medians
in one run (the target is at most 3x). Writes Markdown and JSON if asked.

    python benchmarks/bench_startup.py --repeats 7 --markdown docs/startup.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402

BIN = Path(sys.executable).parent
#: --help and argument errors should take at most this many times `python -c "import click"`.
TARGET = 3.0
COMMANDS = {
    "python -c 'import click' (baseline)": [sys.executable, "-c", "import click"],
    "dataselect --help": [str(BIN / "dataselect"), "--help"],
    "dataselect compare --help": [str(BIN / "dataselect"), "compare", "--help"],
    "dataselect-train --help": [str(BIN / "dataselect-train"), "--help"],
    "dataselect-server --help": [str(BIN / "dataselect-server"), "--help"],
    "dataselect-train --epochs 0 (argument error)": [str(BIN / "dataselect-train"), "--epochs", "0"],
    "dataselect-server --port x (argument error)": [str(BIN / "dataselect-server"), "--port", "x"],
}


def once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            times[name].append(once(cmd))
    base = statistics.median(next(iter(times.values())))
    rows = [(name, statistics.median(v), statistics.median(v) / base) for name, v in times.items()]
    lines = ["| command | median seconds | ratio to `import click` | within 3x |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {sec:.3f} | {ratio:.2f} | {'yes' if ratio <= TARGET else '**no**'} |"
              for name, sec, ratio in rows]
    table = "\n".join(lines)
    missed = [name for name, _, ratio in rows if ratio > TARGET]
    print(table)
    if args.markdown:
        info = machine()
        Path(args.markdown).write_text(
            "# Command-line startup\n\n"
            f"`python benchmarks/bench_startup.py --repeats {args.repeats} --markdown {args.markdown}`, "
            f"{args.repeats} interleaved rounds, fresh processes; machine: {info}.\n\n" + table + "\n\n"
            f"Target: every command within {TARGET:g}x of `python -c 'import click'`. "
            + ("All meet it: help and argument errors load neither torch nor grpc.\n" if not missed else
               f"Missed by {len(missed)}: " + ", ".join(f"`{m}`" for m in missed) + ".\n"))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows, "rounds": times}, indent=2))


if __name__ == "__main__":
    main()
