"""Benchmark: how often a model's answer is invalid without and with constrained decoding, and what the constraint
costs in latency.

1. Invalid rates and latency: a model (default: the tiny offline Llama of the tests, random weights, which emits
   garbage) answers the prompts of the bundled example's scored turns through `CommandGenerator`, once free and once
   constrained to the assistant's command grammar (per dialogue state) by `CommandLogitsProcessor`. An answer is
   *invalid* when a line does not parse, a command is dropped by validation, or it has no command at all.
2. Cost of the constraint with a realistically large vocabulary: a byte-level BPE tokenizer of `--vocab-size`
   tokens is trained on this machine's Python standard library, and every expected answer of the example is forced
   through the constraint token by token: the fast path (is the model's best token allowed?) is what each step of a
   good model costs; the full mask (every allowed token of a grammar state, built once per state and cached) is what
   a step costs the first time a bad model leaves the fast path there.

    python bench/bench_constrained.py                         # what BENCHMARKS.md records
    python bench/bench_constrained.py --model outputs/cmdgen  # a real finetuned model

Prints tables and writes JSON (default bench/results/bench_constrained.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the library, and the tiny model of the tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the tiny offline test model, random weights)")
    parser.add_argument("--turns", type=int, default=40, help="example turns to answer (default: 40)")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer token bound (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="tokenizer for the mask cost (default: 32000)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench_constrained.json")
    return parser.parse_args()


def is_invalid(prediction: Any) -> bool:
    return not prediction.parseable or bool(prediction.invalid) or not prediction.commands


def summary(predictions: list[Any]) -> dict[str, float]:
    latencies = sorted(p.latency_s for p in predictions)
    tokens = sum(p.completion_tokens for p in predictions)
    return {
        "answers": len(predictions),
        "invalid_answer_rate": sum(map(is_invalid, predictions)) / len(predictions),
        "unparseable_rate": sum(not p.parseable for p in predictions) / len(predictions),
        "invalid_command_rate": _ratio(
            sum(len(p.invalid) for p in predictions), sum(len(p.invalid) + len(p.commands) for p in predictions)
        ),
        "truncated_rate": sum(p.finish_reason == "length" for p in predictions) / len(predictions),
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "mean_answer_tokens": tokens / len(predictions),
        "ms_per_token": 1000 * sum(latencies) / max(tokens, 1),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def invalid_rates(project: Any, cases: list[Any], model: str | None, max_tokens: int, threads: int) -> dict[str, Any]:
    from recipe.backends import LocalModelBackend
    from recipe.runtime import CommandGenerator

    with tempfile.TemporaryDirectory() as scratch:
        if model is None:
            from tiny_model import build_tiny_model

            model = str(build_tiny_model(Path(scratch) / "tiny"))
        backend = LocalModelBackend(model, max_new_tokens=max_tokens, threads=threads)
        results = {}
        for constrained in (False, True):
            generator = CommandGenerator.for_model(project, backend, constrained=constrained)
            generator.predict(cases[0].state, cases[0].user_message, current_datetime=cases[0].when)  # warm-up
            predictions = [generator.predict(c.state, c.user_message, current_datetime=c.when) for c in cases]
            results["constrained" if constrained else "free"] = summary(predictions)
            results["examples_" + ("constrained" if constrained else "free")] = [p.raw_text for p in predictions[:3]]
    return results


def large_tokenizer(vocab_size: int, folder: Path) -> Any:
    """A byte-level BPE with `vocab_size` tokens, trained on a slice of the Python standard library's sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = []
    size = 0
    for path in sources:
        chunk = path.read_text(encoding="utf-8", errors="ignore")
        text.append(chunk)
        size += len(chunk)
        if size > 6_000_000:
            break
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def mask_cost(project: Any, cases: list[Any], vocab_size: int) -> dict[str, Any]:
    from recipe.commands import Syntax, format_commands
    from recipe.decoding import TokenConstraint, TokenVocabulary
    from recipe.grammar import DEAD, build_grammar
    from recipe.tracker import startable_flows

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        tokenizer = large_tokenizer(vocab_size, Path(scratch))
        trained_s = time.perf_counter() - started
    started = time.perf_counter()
    vocabulary = TokenVocabulary.from_tokenizer(tokenizer)
    vocabulary_s = time.perf_counter() - started
    eos = [tokenizer.eos_token_id]
    constraints: dict[tuple[str, ...], TokenConstraint] = {}
    fast: list[float] = []
    full_first: list[float] = []
    full_cached: list[float] = []
    steps = 0
    for case in cases:
        flows = tuple(f.id for f in startable_flows(project, case.state.slots))
        if flows not in constraints:
            constraints[flows] = TokenConstraint(
                build_grammar(project, Syntax.V2, flows=flows).matcher(), vocabulary, eos
            )
        constraint = constraints[flows]
        answer = format_commands(case.expected, Syntax.V2)
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        state = constraint.matcher.start
        budget = 512  # never binding here: this measures the masks, not the budget
        for position, token_id in enumerate(ids):
            left = budget - position
            began = time.perf_counter()
            assert constraint.fits(state, token_id, left), (answer, position)
            fast.append(time.perf_counter() - began)
            first_visit = state not in constraint._allowed
            began = time.perf_counter()
            allowed = constraint.allowed(state, left)
            (full_first if first_visit else full_cached).append(time.perf_counter() - began)
            assert token_id in allowed
            steps += 1
            if token_id not in eos:
                state = constraint.advance(state, token_id)
                assert state != DEAD
    return {
        "vocab_size": len(tokenizer),
        "tokenizer_training_s": trained_s,
        "vocabulary_trie_s": vocabulary_s,
        "grammars": len(constraints),
        "steps": steps,
        "fast_path_us_median": statistics.median(fast) * 1e6,
        "full_mask_first_visit_ms_median": statistics.median(full_first) * 1000,
        "full_mask_first_visit_ms_max": max(full_first) * 1000,
        "full_mask_first_visits": len(full_first),
        "full_mask_cached_us_median": statistics.median(full_cached) * 1e6 if full_cached else None,
    }


def main() -> None:
    args = parse_args()
    from recipe.commands import Syntax
    from recipe.evaluate import load_cases
    from recipe.project import load_project
    from recipe.prompt import DatetimePolicy

    project = load_project(REPO)
    cases = load_cases(project, [str(REPO / "e2e_tests")], DatetimePolicy(), Syntax.V2, include_derived=True)
    print(
        f"{len(cases)} turns in the example; answering {min(args.turns, len(cases))}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    rates = invalid_rates(project, cases[: args.turns], args.model, args.max_tokens, args.threads)
    print(
        f"\n{'':<12} {'invalid':>8} {'unparse':>8} {'bad cmd':>8} {'cut':>6} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'tokens':>7} {'ms/tok':>7}"
    )
    for mode in ("free", "constrained"):
        r = rates[mode]
        bad = "—" if r["invalid_command_rate"] is None else f"{100 * r['invalid_command_rate']:.0f}%"
        print(
            f"{mode:<12} {100 * r['invalid_answer_rate']:7.0f}% {100 * r['unparseable_rate']:7.0f}% {bad:>8} "
            f"{100 * r['truncated_rate']:5.0f}% {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['mean_answer_tokens']:7.1f} "
            f"{r['ms_per_token']:7.2f}"
        )
    print("examples, free:       ", [text[:40] for text in rates["examples_free"]])
    print("examples, constrained:", rates["examples_constrained"])
    cost = mask_cost(project, cases, args.vocab_size)
    print(
        f"\nmask cost, vocabulary {cost['vocab_size']} tokens (trie built in {cost['vocabulary_trie_s']:.2f} s), "
        f"{cost['steps']} steps over {len(cases)} expected answers, {cost['grammars']} grammars:"
    )
    print(f"  fast path (best token allowed?)  {cost['fast_path_us_median']:.1f} µs per step (median)")
    print(
        f"  full mask, first visit of state  {cost['full_mask_first_visit_ms_median']:.1f} ms median, "
        f"{cost['full_mask_first_visit_ms_max']:.1f} ms max, {cost['full_mask_first_visits']} states"
    )
    if cost["full_mask_cached_us_median"] is not None:
        print(f"  full mask, cached state          {cost['full_mask_cached_us_median']:.1f} µs per step (median)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    facts = {
        "machine": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "model": args.model or "tiny random",
        "turns": min(args.turns, len(cases)),
        "max_tokens": args.max_tokens,
    }
    args.json.write_text(json.dumps({"facts": facts, "rates": rates, "mask_cost": cost}, indent=2) + "\n")
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
