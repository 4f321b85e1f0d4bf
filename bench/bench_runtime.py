"""Benchmark: what the runtime adds around the model call, and the latency of `recipe serve` on CPU.

1. Overhead per turn: for every scored turn of the bundled example (user turns with commands, derived from the
   tests), with the conversation state replayed beforehand, time `render` (prompt variables + Jinja2), `parse`
   (the model's answer, here the expected commands in v2) and `validate` (against flows, domain and the state's flow
   guards), and the whole `CommandGenerator.predict` minus the model call (`Prediction.overhead_s`, measured with an
   in-process backend that answers at once).
2. Serving: the tiny offline model (tests/rt_artifacts.py: tiny Llama + LoRA, merged) answers the example's prompts
   in process (`LocalModelBackend.generate`) and through `recipe serve` on 127.0.0.1 with the `openai` client,
   one request at a time, then with 4 clients at once. The untrained model never stops by itself, so every answer is
   exactly `--max-tokens` tokens: latency per request and tokens per second are comparable across runs.

    python bench/bench_runtime.py                   # what BENCHMARKS.md records
    python bench/bench_runtime.py --turns 20 --max-tokens 16

Prints tables and writes JSON (default bench/results/bench_runtime.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the library, and the tiny model of the tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="passes over all turns for the overhead (default: 20)")
    parser.add_argument("--turns", type=int, default=30, help="prompts sent to the model when serving (default: 30)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request (default: 16)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in the last run (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per generation (default: 1)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench_runtime.json")
    return parser.parse_args()


def example_turns() -> tuple[Any, list[Any]]:
    from recipe.commands import Syntax
    from recipe.evaluate import load_cases
    from recipe.project import load_project
    from recipe.prompt import DatetimePolicy

    project = load_project(REPO)
    cases = load_cases(project, [str(REPO / "e2e_tests")], DatetimePolicy(), Syntax.V2, include_derived=True)
    return project, cases


class InstantBackend:
    """Answers with the expected commands at once: `predict` then times only the runtime's own work."""

    name = "instant"

    def __init__(self) -> None:
        self.answer = ""

    def complete(self, prompt: str, *, grammar: Any = None) -> Any:
        from recipe.backends import Completion

        return Completion(self.answer, 0, 0, "stop", 0.0)


def microseconds(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_us": statistics.median(ordered) * 1e6, "p95_us": ordered[int(0.95 * (len(ordered) - 1))] * 1e6}


def measure_overhead(project: Any, cases: list[Any], repeat: int) -> dict[str, Any]:
    from recipe.command_validation import validate_commands
    from recipe.commands import Syntax, format_commands, parse_model_output
    from recipe.runtime import CommandGenerator

    backend = InstantBackend()
    generator = CommandGenerator.for_model(project, backend)
    answers = [format_commands(case.expected, Syntax.V2) for case in cases]
    timings: dict[str, list[float]] = {"render": [], "parse": [], "validate": [], "predict overhead": []}
    for _ in range(repeat):
        for case, answer in zip(cases, answers):
            started = time.perf_counter()
            generator.render(case.state, case.user_message, case.when)
            rendered = time.perf_counter()
            parsed = parse_model_output(answer, Syntax.V2)
            parsed_at = time.perf_counter()
            validate_commands(parsed.commands, project, case.state)
            validated = time.perf_counter()
            backend.answer = answer
            prediction = generator.predict(case.state, case.user_message, current_datetime=case.when)
            timings["render"].append(rendered - started)
            timings["parse"].append(parsed_at - rendered)
            timings["validate"].append(validated - parsed_at)
            timings["predict overhead"].append(prediction.overhead_s)
    return {name: microseconds(values) for name, values in timings.items()}


def latency_summary(latencies: list[float], tokens: int, wall_s: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[int(0.95 * (len(ordered) - 1))] * 1000,
        "tokens_per_s": tokens / wall_s,
        "requests_per_s": len(ordered) / wall_s,
    }


def measure_serving(
    project: Any, cases: list[Any], turns: int, max_tokens: int, clients: int, threads: int
) -> dict[str, Any]:
    import openai
    from rt_artifacts import finetuned_folder

    from recipe.backends import LocalModelBackend
    from recipe.prompt import PROMPTS_DIR, load_template
    from recipe.runtime import CommandGenerator
    from recipe.serve import ModelServer, ServeLimits, create_app, running_in_background

    with tempfile.TemporaryDirectory() as scratch:
        folder = finetuned_folder(Path(scratch), load_template(PROMPTS_DIR / "command_prompt_v2.jinja2"))
        backend = LocalModelBackend(folder, max_new_tokens=max_tokens, threads=threads)
        generator = CommandGenerator.for_model(project, backend)
        prompts = [generator.render(c.state, c.user_message, c.when) for c in cases[:turns]]
        backend.complete(prompts[0])  # warm-up: first-call allocations

        def complete(prompt: str) -> tuple[float, Any]:
            began = time.perf_counter()  # wall time, tokenization included, as the server's clients see it
            completion = backend.complete(prompt)
            return time.perf_counter() - began, completion

        started = time.perf_counter()
        local = [complete(prompt) for prompt in prompts]
        local_wall = time.perf_counter() - started
        prompt_tokens = statistics.mean(c.prompt_tokens for _, c in local)

        server = ModelServer(backend, "tiny", ServeLimits(max_tokens=max_tokens, default_max_tokens=max_tokens))
        with running_in_background(create_app(server)) as url:
            client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0)

            def ask(prompt: str) -> tuple[float, int]:
                began = time.perf_counter()
                response = client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
                )
                return time.perf_counter() - began, response.usage.completion_tokens

            ask(prompts[0])
            started = time.perf_counter()
            served = [ask(prompt) for prompt in prompts]
            served_wall = time.perf_counter() - started

            results: list[tuple[float, int]] = []
            lock = threading.Lock()

            def worker(share: list[str]) -> None:
                for prompt in share:
                    outcome = ask(prompt)
                    with lock:
                        results.append(outcome)

            threads = [threading.Thread(target=worker, args=(prompts[i::clients],)) for i in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            concurrent_wall = time.perf_counter() - started
    return {
        "prompt_tokens_mean": prompt_tokens,
        "answer_tokens": max_tokens,
        "in_process": latency_summary([s for s, _ in local], sum(c.completion_tokens for _, c in local), local_wall),
        "served_1_client": latency_summary([s for s, _ in served], sum(n for _, n in served), served_wall),
        f"served_{clients}_clients": latency_summary(
            [s for s, _ in results], sum(n for _, n in results), concurrent_wall
        ),
    }


def main() -> None:
    args = parse_args()
    project, cases = example_turns()
    print(f"{len(cases)} turns; torch threads per generation {args.threads}; load average {os.getloadavg()[0]:.1f}")
    overhead = measure_overhead(project, cases, args.repeat)
    print("\nruntime overhead per turn (median / p95, microseconds)")
    for name, values in overhead.items():
        print(f"  {name:<18} {values['median_us']:8.1f} {values['p95_us']:8.1f}")
    serving = measure_serving(project, cases, args.turns, args.max_tokens, args.clients, args.threads)
    print(
        f"\nserving the tiny model on CPU: {serving['prompt_tokens_mean']:.0f} prompt tokens on average, "
        f"{args.max_tokens} answer tokens"
    )
    print(f"  {'':<18} {'p50 ms':>8} {'p95 ms':>8} {'tok/s':>8} {'req/s':>8}")
    for name, values in serving.items():
        if isinstance(values, dict):
            print(
                f"  {name:<18} {values['p50_ms']:8.1f} {values['p95_ms']:8.1f} {values['tokens_per_s']:8.1f} "
                f"{values['requests_per_s']:8.2f}"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    facts = {
        "machine": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "turns": len(cases),
        "torch_threads": args.threads,
    }
    args.json.write_text(json.dumps({"facts": facts, "overhead": overhead, "serving": serving}, indent=2) + "\n")
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
