"""The run summary (`result_summary.yaml`) of `recipe prepare-data`, from the test cases' results and the rows
written."""

from __future__ import annotations

from collections import Counter
from typing import Any

from recipe.records import SplitRows, TestCaseResult


def split_section(rows: SplitRows, suites: dict[str, int]) -> dict[str, Any]:
    """The summary's `recipe.split`: test cases per side, the covering ones, what validation lacks, the suites."""
    split = rows.split
    return {
        "train_test_cases": len(split.train),
        "validation_test_cases": len(split.validation),
        "covering_test_cases": split.cover,
        "validation_lacks": split.validation_lacks,
        "train_suites_test_cases": suites["train"],
        "validation_suites_test_cases": suites["validation"],
    }


def run_summary(
    results: list[TestCaseResult],
    rows: SplitRows,
    suites: dict[str, int],
    usage: dict[str, Any],
    num_rephrases: int,
    check: str,
) -> dict[str, Any]:
    """`result_summary.yaml` of a run: what was read, annotated, rephrased, validated, kept and split, per test case
    and in all; `num_rephrases` asked per message, `check` the validation the paraphrases passed."""
    split, rows_per_test = rows.split, rows.rows_per_test
    train_ids, validation_ids = set(split.train), set(split.validation)
    verdicts = [v for r in results for vs in r.verdicts.values() for v in vs]
    annotated = [r for r in results if any(t.commands for t in r.annotation.turns)]
    skipped = [
        {"test": r.test_case.id, "turn": t.number, "reason": t.reason}
        for r in results
        for t in r.annotation.turns
        if t.commands is None
    ]
    # Turns the command generator never answers: they change the dialogue state but yield no rows.
    not_generator = [
        {"test": r.test_case.id, "turn": t.number, "reason": t.reason, "source": t.source}
        for r in results
        for t in r.annotation.turns
        if t.source in ("payload", "nlu")
    ]
    warnings: Counter[str] = Counter()
    for result in results:
        warnings.update(result.tracker_warnings)
    requested = sum(r.rephrase.requested if r.rephrase else len(r.messages) * num_rephrases for r in results)
    received = sum(len(vs) for r in results for vs in r.verdicts.values())
    per_test = {
        r.test_case.id: {
            "annotated_turns": sum(1 for t in r.annotation.turns if t.commands),
            "skipped_turns": sum(1 for t in r.annotation.turns if t.commands is None),
            "payload_turns": sum(1 for t in r.annotation.turns if t.source == "payload"),
            "nlu_turns": sum(1 for t in r.annotation.turns if t.source == "nlu"),
            "rephrasings_passing": sum(v.passed for vs in r.verdicts.values() for v in vs),
            "rephrasings_failing": sum(not v.passed for vs in r.verdicts.values() for v in vs),
            "rows": rows_per_test[r.test_case.id],
            "split": "train"
            if r.test_case.id in train_ids
            else ("validation" if r.test_case.id in validation_ids else "none (no rows)"),
            **({"state_disagreements": dict(r.disagreements)} if r.disagreements else {}),
            **({"state_inferences": dict(r.inferences)} if r.inferences else {}),
            **({"errors": r.errors} if r.errors else {}),
        }
        for r in results
    }
    return {
        "num_input_e2e_tests": len(results),
        "num_annotated_conversations": len(annotated),
        "num_user_messages_across_conversations": sum(len(r.test_case.user_steps) for r in annotated),
        "num_user_messages_to_rephrase_across_conversations": sum(len(r.messages) for r in results),
        "num_passing_rephrased_user_messages": sum(v.passed for v in verdicts),
        "num_failing_rephrased_user_messages": sum(not v.passed for v in verdicts),
        "num_ft_data_points": rows.kept,
        "num_train_data_points": rows.train_rows,
        "num_val_data_points": rows.val_rows,
        "recipe": {
            # Test cases whose result came from OUT/cache: nothing they depend on changed since it was made.
            "test_cases_reused": sum(r.reused for r in results),
            # Turns after which the replayed state contradicts the test's own bot turns or assertions.
            "state_disagreements": sum(len(r.disagreements) for r in results),
            "rows_left_out_disagreeing": sum(r.rows_left_out_disagreeing for r in results),
            "state_inferences": sum(len(what) for r in results for what in r.inferences.values()),
            "rephrasings": {
                "requested": requested,
                "received": received,
                "passing": sum(v.passed for v in verdicts),
                "failing": sum(not v.passed for v in verdicts),
                "check": check,
            },
            "rows": {
                "before_dedup": rows.before_dedup,
                "duplicates_dropped": rows.before_dedup - rows.kept,
                "validation_rows_dropped_as_in_train": rows.leaked,
                "per_command_type": dict(sorted(rows.per_command.items())),
            },
            "split": split_section(rows, suites),
            "skipped_turns": skipped,
            "turns_without_rows": {
                "payload": sum(1 for t in not_generator if t["source"] == "payload"),
                "nlu": sum(1 for t in not_generator if t["source"] == "nlu"),
            },
            "nlu_turns": [{k: v for k, v in t.items() if k != "source"} for t in not_generator if t["source"] == "nlu"],
            "values_the_runtime_would_alter": rows.lossy,
            "tracker_warnings": dict(warnings.most_common()),
            "errors": [f"{r.test_case.id}: {e}" for r in results for e in r.errors],
            # Every call that failed after its retries, per role (each makes the run exit 1), and roles that stopped
            # being called; empty or cut answers are retried and counted in llm_usage, never kept.
            "failed_llm_calls": {role: u.get("failures", 0) for role, u in usage.items()},
            "llm_roles_down": {role: u["down"] for role, u in usage.items() if u.get("down")},
            "llm_usage": usage,
            "estimated_cost_usd": round(sum(u.get("estimated_cost_usd", 0) or 0 for u in usage.values()), 4),
            "per_test_case": per_test,
        },
    }


def failure_lines(summary: dict[str, Any]) -> list[str]:
    """What failed, per role, for stderr: empty when every LLM call succeeded."""
    extra = summary["recipe"]
    lines = []
    for role, failed in extra.get("failed_llm_calls", {}).items():
        usage = extra["llm_usage"].get(role, {})
        if not failed:
            continue
        incomplete = []
        if usage.get("truncated"):
            incomplete.append(
                f"{usage['truncated']} answer(s) cut at the token limit: raise max_completion_tokens "
                f"in the {role}'s LLM config"
            )
        if usage.get("empty_answers"):
            incomplete.append(f"{usage['empty_answers']} empty answer(s)")
        down = extra.get("llm_roles_down", {}).get(role)
        lines.append(
            f"{role}: {failed} LLM call(s) failed after retries"
            + (f" ({usage.get('not_sent', 0)} not sent: the {role} is down: {down})" if down else "")
            + (f"; {'; '.join(incomplete)}" if incomplete else "")
        )
    return lines


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A short human summary for the terminal."""
    extra = summary["recipe"]
    return [
        f"test cases: {summary['num_input_e2e_tests']} ({summary['num_annotated_conversations']} annotated"
        + (
            f"; {extra['test_cases_reused']} unchanged since the last run, taken from the cache"
            if extra.get("test_cases_reused")
            else ""
        )
        + ")",
        f"rephrasings: {extra['rephrasings']['passing']} passing, {extra['rephrasings']['failing']} failing "
        f"({extra['rephrasings']['check']} check)",
        f"rows: {summary['num_ft_data_points']} ({extra['rows']['duplicates_dropped']} duplicates dropped)",
        f"split: {summary['num_train_data_points']} train rows / {summary['num_val_data_points']} val rows "
        f"({extra['split']['train_test_cases']} / {extra['split']['validation_test_cases']} test cases)"
        + (
            "; no validation rows: finetune will train without validation" if not summary["num_val_data_points"] else ""
        ),
        f"state disagreements with the tests' own bot turns: {extra['state_disagreements']} "
        f"({extra['rows_left_out_disagreeing']} rows left out; --keep-disagreeing keeps them); "
        f"inferred from bot turns: {extra['state_inferences']}",
        f"skipped turns: {len(extra['skipped_turns'])}; payload turns: {extra['turns_without_rows']['payload']}; "
        f"NLU turns: {extra['turns_without_rows']['nlu']}; LLM errors: {len(extra['errors'])}; "
        f"estimated cost: ${extra['estimated_cost_usd']}",
    ]
