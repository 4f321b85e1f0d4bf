"""Benchmark: `prepare-data` against a local OpenAI-compatible server with a fixed latency per call.

Compares the wall time with the ideal (calls x latency / concurrency) and with one call at a time (what a
sequential tool pays). Every run starts with an empty cache. The server runs in its own process, so its threads do
not compete with the pipeline for the interpreter lock.

    python bench/bench_prepare.py --latency 0.1 --concurrency 1 4 16 32
    python bench/bench_prepare.py --latency 0 --concurrency 64 --profile 25   # where the CPU per call goes

`cpu s` is the pipeline's own CPU time (the server's is in its process); `floor s` = max(ideal, cpu s): no run can
beat the latency-bound ideal or its own CPU work on one interpreter.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import openai  # noqa: E402, F401  # imported up front: a one-time cost (~1 s), not CPU per call
from prepare_llm import ScriptedAssistantLLM  # noqa: E402

from recipe.commands import Syntax  # noqa: E402
from recipe.llm import LLMConfig  # noqa: E402
from recipe.prepare import PrepareConfig, prepare_data  # noqa: E402
from recipe.project import load_project  # noqa: E402
from recipe.prompt import PROMPTS_DIR, DatetimePolicy, choose_template, load_template  # noqa: E402
from recipe.testing.openai_server import ScriptedOpenAIServer  # noqa: E402


def serve(tests: list[str], latency: float, urls: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    responder = ScriptedAssistantLLM(load_project(ROOT), tests)
    with ScriptedOpenAIServer(responder, latency_s=latency) as server:
        urls.put(server.base_url)
        stop.wait()


def run_once(project, tests: list[str], latency: float, concurrency: int, rephrases: int, profile: int = 0) -> dict:
    urls: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=serve, args=(tests, latency, urls, stop), daemon=True)
    process.start()
    base_url = urls.get(timeout=60)
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLMConfig(provider="self-hosted", model="scripted-model", api_base=base_url, timeout=30)
        config = PrepareConfig(
            tests=tests,
            out=Path(tmp) / "out",
            syntax=Syntax.V2,
            template=choose_template(project, Syntax.V2),
            datetime_policy=DatetimePolicy(),
            num_rephrases=rephrases,
            rephrase_llm=llm,
            rephrase_template=load_template(PROMPTS_DIR / "rephrase.jinja2"),
            teacher_llm=llm,
            oracle_llm=llm,
            max_concurrency=concurrency,
            show_progress=False,
        )
        profiler = cProfile.Profile(time.process_time) if profile else None
        start, cpu_start = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        result = prepare_data(project, config)
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stop.set()
    process.join(timeout=10)
    if profiler:
        print(f"--- CPU profile, concurrency {concurrency}: top {profile} by own time ---")
        pstats.Stats(profiler).sort_stats(os.environ.get("BENCH_SORT", "tottime")).print_stats(profile)
    usage = result.summary["recipe"]["llm_usage"]
    calls = sum(role["api_calls"] for role in usage.values())
    return {
        "concurrency": concurrency,
        "calls": calls,
        "wall_s": round(wall, 2),
        "ideal_s": round(calls * latency / concurrency, 2),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_call": round(1000 * cpu / max(calls, 1), 2),
        "floor_s": round(max(calls * latency / concurrency, cpu), 2),
        "wall_vs_floor": round(wall / max(calls * latency / concurrency, cpu), 2),
        "sequential_s": round(calls * latency, 2),
        "speedup_vs_sequential": round(calls * latency / wall, 1),
        "rows": result.summary["num_ft_data_points"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the server waits per call")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rephrases", type=int, default=3)
    parser.add_argument("--tests", nargs="+", default=["e2e_tests/"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--copies", type=int, default=1, help="the tests copied N times (bench/scale_tests.py)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions by CPU time")
    args = parser.parse_args()
    project = load_project(ROOT)
    tests = args.tests
    if args.copies > 1:
        from scale_tests import copied_tests

        tests = copied_tests(Path(tempfile.mkdtemp(prefix="bench_prepare.")), args.copies)
    results = [run_once(project, tests, args.latency, c, args.rephrases, args.profile) for c in args.concurrency]
    print(
        f"latency per call: {args.latency} s, {args.rephrases} paraphrases per message, tests: {args.tests} "
        f"x{args.copies}"
    )
    print(
        f"{'concurrency':>11} {'calls':>6} {'wall s':>8} {'ideal s':>8} {'cpu s':>7} {'ms/call':>8} "
        f"{'wall/floor':>10} {'sequential s':>13} {'speedup':>8}"
    )
    for r in results:
        print(
            f"{r['concurrency']:>11} {r['calls']:>6} {r['wall_s']:>8} {r['ideal_s']:>8} {r['cpu_s']:>7} "
            f"{r['cpu_ms_per_call']:>8} {r['wall_vs_floor']:>10} {r['sequential_s']:>13} "
            f"{r['speedup_vs_sequential']:>7}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
