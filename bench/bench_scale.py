"""Benchmark: `recipe prepare-data --offline` at 1x, 10x, 40x the bundled example (renamed copies of its tests).

Each run is its own process (`/usr/bin/time` gives wall time and peak RSS), from an empty output folder; then, with
`--rerun`, the same command again into the same folder (what a cached re-run costs).

    python bench/bench_scale.py --copies 1 10 40 --rerun
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_tests import ROOT, copied_tests


def timed_run(tests: list[str], out: Path, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".time") as times:
        command = [
            "/usr/bin/time",
            "-f",
            "%e %M",
            "-o",
            times.name,
            sys.executable,
            "-m",
            "recipe",
            "prepare-data",
            "--offline",
            "--no-progress",
            "-o",
            str(out),
            *extra,
            *tests,
        ]
        started = time.perf_counter()
        subprocess.run(
            command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=os.environ | {"PYTHONHASHSEED": "0"}
        )
        wall = time.perf_counter() - started
        _, rss_kb = Path(times.name).read_text().split()[-2:]
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(rss_kb) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument("--rerun", action="store_true", help="also time a second run into the same folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("extra", nargs="*", help="more prepare-data options (after --)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for copies in args.copies:
            tests = copied_tests(Path(tmp) / f"tests_{copies}", copies)
            out = Path(tmp) / f"out_{copies}"
            first = timed_run(tests, out, args.extra)
            row = {"copies": copies, **first}
            if args.rerun:
                again = timed_run(tests, out, args.extra)
                row |= {"rerun_wall_s": again["wall_s"], "rerun_peak_rss_mb": again["peak_rss_mb"]}
            results.append(row)
            print(json.dumps(row), flush=True)
    base = results[0]
    for r in results:
        r["time_ratio_vs_first"] = round(r["wall_s"] / base["wall_s"], 1)
    print(f"{'copies':>6} {'wall s':>8} {'x first':>8} {'peak RSS MB':>12}" + (" rerun s" if args.rerun else ""))
    for r in results:
        print(
            f"{r['copies']:>6} {r['wall_s']:>8} {r['time_ratio_vs_first']:>8} {r['peak_rss_mb']:>12}"
            + (f" {r['rerun_wall_s']:>7}" if args.rerun else "")
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
