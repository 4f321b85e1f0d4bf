"""`recipe evaluate`: run one or more models over turns with known commands and report how well they do.

Cases come from test cases with commands (each user turn's prompt rendered from the replayed dialogue state, as the
runtime would) or from `val.jsonl` rows (prompt and expected completion as written). Every model answers every case
through `recipe.runtime.CommandGenerator` (render, call, parse, validate); a turn is correct when its kept commands
equal the expected ones as a multiset (`command_key`: flows by id, slots by name and normalised value, float slots'
values as numbers, clarify by options), and a test case when all its scored turns are.

The report has what dialogue-understanding tests show (per command type TP/FP/FN, precision, recall, F1; accuracy
per turn and per test case) and what they lack: unparseable answers, invalid commands (with hallucinated flows),
accuracy per flow, slot-name-only matches, latency (p50, p95, tokens per second) and the worst turns with their
prompt, expected and predicted commands. Several models are shown side by side (e.g. the teacher and the student).
`recipe.evaluate_report` writes it from the `ModelResult`s computed here.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from recipe.backends import DEFAULT_MAX_TOKENS, Backend, BackendError, LocalModelBackend, OpenAIBackend
from recipe.commands import (
    CannotHandle,
    Clarify,
    Command,
    SetSlot,
    StartFlow,
    Syntax,
    command_key,
    detect_syntax,
    format_commands,
    parse_model_output,
    unsupported_reason,
)
from recipe.errors import ConfigError, InputError
from recipe.llm import is_loopback
from recipe.project import Project
from recipe.prompt import DatetimePolicy
from recipe.runtime import CommandGenerator, Prediction
from recipe.tracker import DialogueState

log = logging.getLogger(__name__)

NO_FLOW = "(no flow)"
NAME_ONLY = "set slot (name only)"


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One scored user turn (or val row): what the model sees and what it should answer."""

    id: str  # "<test file>::<test case>#<turn>" or "<val file>:<line>"
    test_case: str | None
    user_message: str
    expected: tuple[Command, ...]
    flow: str  # the flow the turn belongs to: the one it starts, else the one in progress
    source: str  # "test" (written commands), "assertions" (derived from the test's assertions) or "val"
    state: DialogueState | None = None
    when: datetime | None = None
    prompt: str | None = None  # fixed (val rows); None: rendered per model from state, message and date
    float_slots: frozenset[str] = frozenset()  # slots whose values are scored as numbers (3 == 3.0)


@dataclass(frozen=True)
class LeftOut:
    """Turns of the test inputs that are not scored: those whose commands are derived from the test's assertions,
    not written as `commands:` (scored with --include-derived), and turns the command generator never answers
    (button payloads, turns NLU answered)."""

    turns: int = 0  # derived from assertions
    test_cases: int = 0  # test cases with no scored turn left because of derived turns
    payload_turns: int = 0
    nlu_turns: int = 0
    rasa_version_turns: int = 0  # labelled with a command the target release drops, or after such a turn

    def message(self) -> str:
        parts = []
        if self.turns:
            parts.append(
                f"left out {self.turns} turn(s) ({self.test_cases} test case(s) entirely) whose commands are "
                "derived from the tests' assertions, not written as `commands:`; --include-derived scores "
                "them too"
            )
        if self.rasa_version_turns:
            parts.append(
                f"left out {self.rasa_version_turns} turn(s) labelled with a command the target Rasa Pro "
                "release no longer parses (`hand over` from 3.16 on; the runtime drops it and answers "
                "`cannot handle`), or coming after such a turn; --rasa-version 3.15 scores them"
            )
        if self.payload_turns:
            parts.append(
                f"left out {self.payload_turns} payload turn(s): button payloads never reach the command "
                "generator (`rasa test du` scores those with written commands, as answered by the runtime: "
                "the Rasa rows and table count them)"
            )
        if self.nlu_turns:
            parts.append(
                f"left out {self.nlu_turns} NLU turn(s): their commands set slots the command generator does not fill"
            )
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "test_cases": self.test_cases,
            "reason": "assertions",
            "payload_turns": self.payload_turns,
            "nlu_turns": self.nlu_turns,
            "rasa_version_turns": self.rasa_version_turns,
        }


def _flow_of(expected: Sequence[Command], state: DialogueState | None, project: Project | None) -> str:
    started = [c.flow for c in expected if isinstance(c, StartFlow)]
    if started:
        return started[0]
    if state is not None and project is not None:
        for frame in reversed(state.stack):  # as the prompt's current flow: not a called flow, not a pattern
            flow = project.flows.get(frame.flow_id)
            if flow is not None and not flow.is_pattern and frame.kind != "called":
                return flow.id
    return NO_FLOW


def cases_from_tests(
    project: Project,
    specs: list[str],
    policy: DatetimePolicy,
    include_derived: bool = False,
    left_out: list[tuple[str, str]] | None = None,
    runtime_turns: list[Case] | None = None,
) -> list[Case]:
    """Each command-generator turn with commands written in the test (and, with `include_derived`, those derived
    from its assertions), with the state before it from replaying the whole test case. Turns left out are appended
    to `left_out` as (turn id, why): "assertions" (derived), "payload" or "nlu". Payload and NLU turns whose test
    writes commands are appended to `runtime_turns` (source "payload" or "nlu"): `rasa test du` scores them too."""
    from recipe.annotate import annotate_from_assertions
    from recipe.conversation import mocked_datetime, replay_test_case
    from recipe.testcases import all_test_cases, load_tests

    wanted = {"test", "assertions"} if include_derived else {"test"}
    cases: list[Case] = []
    for test_case in all_test_cases(load_tests(specs, project)):
        annotation = annotate_from_assertions(project, test_case)
        when = policy.for_conversation(test_case.id, mocked_datetime(test_case))
        for turn in replay_test_case(project, test_case, annotation.commands_for):
            label = annotation.turns[turn.number - 1]
            if label.source in ("payload", "nlu"):
                if left_out is not None:
                    left_out.append((f"{test_case.id}#{turn.number}", label.source))
                if runtime_turns is not None and turn.step.commands:
                    written = tuple(turn.step.commands)
                    runtime_turns.append(
                        Case(
                            id=f"{test_case.id}#{turn.number}",
                            test_case=test_case.id,
                            user_message=turn.text,
                            expected=written,
                            flow=_flow_of(written, turn.state, project),
                            source=label.source,
                        )
                    )
                continue
            if label.commands is None:
                if left_out is not None and label.source == "test":
                    # written commands become unknown only through the target release (`hand over` from 3.16 on),
                    # and the turns after such a turn with them
                    left_out.append((f"{test_case.id}#{turn.number}", "rasa-version"))
                continue
            if label.source not in wanted:
                if left_out is not None and label.source == "assertions":
                    left_out.append((f"{test_case.id}#{turn.number}", "assertions"))
                continue
            expected = tuple(label.commands)
            cases.append(
                Case(
                    id=f"{test_case.id}#{turn.number}",
                    test_case=test_case.id,
                    user_message=turn.text,
                    expected=expected,
                    flow=_flow_of(expected, turn.state, project),
                    source=label.source,
                    state=turn.state,
                    when=when,
                )
            )
    return cases


def cases_from_jsonl(
    path: Path, syntax: Syntax, project: Project | None = None, left_out: list[tuple[str, str]] | None = None
) -> list[Case]:
    """Rows of a split file, read as finetune reads them: `{"prompt", "completion"}` or `{"messages": [...]}`. With
    `project`, its custom commands are read, and a row whose answer holds a command the target Rasa release no
    longer parses (`hand over` from 3.16 on) is left out (appended to `left_out`): the runtime would drop it."""
    _check_jsonl(path)
    cases: list[Case] = []
    for example in _read_rows(path):
        if [message["role"] for message in example.prompt] != ["user"]:
            raise InputError(str(path), example.line, "expected one user message before the answer, as Rasa sends it")
        prompt = example.prompt[0]["content"]
        first_line = next((line for line in example.completion.splitlines() if line.strip()), "")
        custom = project.custom_commands if project is not None else ()
        parsed = parse_model_output(example.completion, detect_syntax(first_line) or syntax, custom=custom)
        if not parsed.fully_parsed:
            raise InputError(
                str(path),
                example.line,
                f"completion line `{parsed.unparsed_lines[0]}` is not a command in {syntax.value} syntax",
            )
        dropped = [
            r for c in parsed.commands if project is not None and (r := unsupported_reason(c, project.rasa_version))
        ]
        if dropped:
            if left_out is not None:
                left_out.append((f"{path.name}:{example.line}", "rasa-version"))
            continue
        cases.append(
            Case(
                id=f"{path.name}:{example.line}",
                test_case=None,
                user_message=_latest_message(prompt),
                expected=parsed.commands,
                flow=_flow_of(parsed.commands, None, None),
                source="val",
                prompt=prompt,
            )
        )
    return cases


def _check_jsonl(path: Path) -> None:
    if not path.is_file():
        raise InputError(str(path), None, "file not found; expected a val.jsonl of prepare-data's ft_splits")


def _read_rows(path: Path) -> list[Any]:
    """Rows as finetune reads them (prompt/completion, messages, or llm_ft_data.jsonl's prompt/output)."""
    from recipe.finetune.data import read_examples

    return read_examples(path)


def _latest_message(prompt: str) -> str:
    # Our templates quote the latest message in triple quotes; otherwise show the prompt's last line.
    if '"""' in prompt:
        parts = prompt.split('"""')
        if len(parts) >= 3:
            return parts[-2]
    return prompt.strip().splitlines()[-1] if prompt.strip() else ""


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    case: Case
    prediction: Prediction | None  # None: the call failed (see error)
    error: str | None = None

    @property
    def predicted(self) -> tuple[Command, ...]:
        return self.prediction.commands if self.prediction is not None else ()

    def key(self, command: Command) -> tuple:
        return command_key(command, float_slots=self.case.float_slots)

    @property
    def correct(self) -> bool:
        return self.prediction is not None and _multiset(self.case.expected, self.key) == _multiset(
            self.predicted, self.key
        )


def _multiset(commands: Sequence[Command], key: Callable[[Command], tuple] = command_key) -> Counter:
    return Counter(key(command) for command in commands)


def predict_case(generator: CommandGenerator, case: Case) -> Outcome:
    try:
        if case.prompt is not None:
            return Outcome(case, generator.predict_prompt(case.prompt, case.state))
        assert case.state is not None
        return Outcome(case, generator.predict(case.state, case.user_message, current_datetime=case.when))
    except BackendError as error:
        if error.fatal:
            raise
        return Outcome(case, None, str(error))


def run_model(
    generator: CommandGenerator,
    cases: Sequence[Case],
    *,
    concurrency: int = 1,
    progress: Callable[[], None] | None = None,
) -> list[Outcome]:
    """Every case through the generator, in order; up to `concurrency` calls at once (endpoints only gain)."""

    def one(case: Case) -> Outcome:
        outcome = predict_case(generator, case)
        if progress is not None:
            progress()
        return outcome

    if concurrency <= 1:
        return [one(case) for case in cases]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, cases))


# ---------------------------------------------------------------------------------------------- metrics


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def command_counts(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """TP/FP/FN per command kind, matching predicted and expected commands by `command_key` per turn (multisets),
    plus set slot matched by slot name only. Kinds that occur on neither side are left out."""
    counts: dict[str, Counter] = defaultdict(Counter)

    def add(label: str, expected: Counter, predicted: Counter) -> None:
        true_positives = sum((expected & predicted).values())
        counts[label]["tp"] += true_positives
        counts[label]["fp"] += sum(predicted.values()) - true_positives
        counts[label]["fn"] += sum(expected.values()) - true_positives

    for outcome in outcomes:
        kinds = {c.kind for c in outcome.case.expected} | {c.kind for c in outcome.predicted}
        for kind in kinds:
            add(
                kind,
                _multiset([c for c in outcome.case.expected if c.kind == kind], outcome.key),
                _multiset([c for c in outcome.predicted if c.kind == kind], outcome.key),
            )
        if SetSlot.kind in kinds:
            expected_names = _multiset([c for c in outcome.case.expected if isinstance(c, SetSlot)], _slot_name)
            add(
                NAME_ONLY,
                expected_names,
                _multiset([c for c in outcome.predicted if isinstance(c, SetSlot)], _slot_name),
            )
    table = {}
    for label in sorted(counts, key=lambda k: (k == NAME_ONLY, k)):
        tp, fp, fn = counts[label]["tp"], counts[label]["fp"], counts[label]["fn"]
        table[label] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "support": tp + fn,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        }
    return table


def _slot_name(command: Command) -> tuple:
    assert isinstance(command, SetSlot)
    return (command.kind, command.slot)


# ---------------------------------------------------------------------------------------------- Rasa's counting
#
# `rasa test du` (Rasa Pro's dialogue-understanding tests) counts differently from the default above, by design of
# its own: it scores every user step whose test writes non-empty `commands:`, payload and NLU turns included (their
# commands come from the runtime's payload and NLU paths, not from the LLM); it compares every command the command
# generators output, so a command the runtime's validation would drop (a categorical value outside the slot's values)
# is a false positive there; an answer with nothing parsed is the generator's `cannot handle`; and a command counts
# as found when an equal one is anywhere in the other list (presence, not multisets). A step passes when both lists
# are as long and every expected command is present; a test case passes when all its steps do, and then all its
# commands are true positives. Ratios with a zero denominator are 0.0. Commands are keyed `start_flow`, `set_slot`, ...


def rasa_predicted(outcome: Outcome) -> tuple[Command, ...]:
    """What `rasa test du` compares for a model's turn: what Rasa's command parser returns, i.e. every parsed
    command, the validator's later drops included (a value outside a categorical slot's values, a slot no flow
    collects, a flow whose guard fails), except what the parser itself drops: `start flow` of an unknown or pattern
    flow, clarify options that are no flow (rasa-formats §5.2, 5-6). An answer with nothing parsed is `cannot
    handle`, as the runtime's command generator answers it. A failed call predicts nothing."""
    if outcome.prediction is None:
        return ()
    parsed = outcome.prediction.commands + tuple(
        d.item for d in outcome.prediction.dropped if isinstance(d.item, Command) and not _parser_drops(d)
    )
    return parsed or (CannotHandle(),)


def _parser_drops(dropped: Any) -> bool:
    # Our validator keeps a clarification's valid options (the command is in `commands`) and lists each bad one.
    return isinstance(dropped.item, Clarify) or (
        isinstance(dropped.item, StartFlow) and dropped.reason.startswith("unknown flow")
    )


def rasa_command_name(command: Command) -> str:
    return command.kind.replace(" ", "_")


def _rasa_equal(first: Command, second: Command, key: Callable[[Command], tuple]) -> bool:
    # options are optional in a DU test's clarify: without options it matches any clarify
    if isinstance(first, Clarify) and isinstance(second, Clarify) and (not first.options or not second.options):
        return True
    return key(first) == key(second)


def _present(command: Command, commands: Sequence[Command], key: Callable[[Command], tuple]) -> bool:
    return any(_rasa_equal(command, other, key) for other in commands)


def rasa_step_passed(
    expected: Sequence[Command], predicted: Sequence[Command], key: Callable[[Command], tuple] = command_key
) -> bool:
    return len(expected) == len(predicted) and all(_present(c, predicted, key) for c in expected)


@dataclass(frozen=True)
class RasaStep:
    case: Case
    predicted: tuple[Command, ...]
    component: str  # who answered: the model's label, or the runtime's payload / NLU path

    def key(self, command: Command) -> tuple:
        return command_key(command, float_slots=self.case.float_slots)

    @property
    def passed(self) -> bool:
        return rasa_step_passed(self.case.expected, self.predicted, self.key)


def rasa_steps(
    outcomes: Sequence[Outcome], runtime_turns: Sequence[Case] = (), component: str = "model"
) -> list[RasaStep]:
    """The steps `rasa test du` scores, in test order: turns with expected commands (a turn expecting none is not a
    step there), and the payload and NLU turns, assumed answered by the runtime with exactly the test's commands."""
    steps = [RasaStep(o.case, rasa_predicted(o), component) for o in outcomes if o.case.expected]
    steps += [RasaStep(case, case.expected, f"runtime ({case.source})") for case in runtime_turns if case.expected]
    order = {case_id: index for index, case_id in enumerate(sorted({s.case.id for s in steps}, key=_turn_order))}
    return sorted(steps, key=lambda step: order[step.case.id])


def _turn_order(case_id: str) -> tuple[str, int]:
    head, _, number = case_id.rpartition("#")
    return (head, int(number)) if number.isdigit() else (case_id, 0)


def rasa_metrics(steps: Sequence[RasaStep], syntax: Syntax = Syntax.V2) -> dict[str, Any]:
    """`rasa test du`'s report numbers and its results file's layout (accuracy, passed/failed counts, per-command
    tp/fp/fn/precision/recall/f1_score/total_count, passed and failed test names, failed steps)."""
    by_test: dict[str, list[RasaStep]] = defaultdict(list)
    for step in steps:
        by_test[step.case.test_case or step.case.id].append(step)  # a val row is a test case of one step
    counts: dict[str, Counter] = defaultdict(Counter)
    for test_steps in by_test.values():
        passed = all(step.passed for step in test_steps)
        for step in test_steps:
            for command in step.case.expected:
                name = rasa_command_name(command)
                counts[name]["total_count"] += 1
                counts[name]["tp" if passed or _present(command, step.predicted, step.key) else "fn"] += 1
            if not passed:
                for command in step.predicted:
                    if not _present(command, step.case.expected, step.key):
                        counts[rasa_command_name(command)]["fp"] += 1

    def safe(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else 0.0

    command_metrics = {}
    for name in sorted(counts):
        tp, fp, fn = counts[name]["tp"], counts[name]["fp"], counts[name]["fn"]
        precision, recall = safe(tp, tp + fp), safe(tp, tp + fn)
        command_metrics[name] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": precision,
            "recall": recall,
            "f1_score": safe(2 * precision * recall, precision + recall),
            "total_count": counts[name]["total_count"],
        }
    passed_tests = [name for name, test_steps in by_test.items() if all(s.passed for s in test_steps)]
    failed_tests = [name for name in by_test if name not in passed_tests]
    passed_steps = sum(step.passed for step in steps)
    return {
        "accuracy": {
            "test_cases": safe(len(passed_tests), len(by_test)),
            "user_utterances": safe(passed_steps, len(steps)),
        },
        "number_of_passed_tests": len(passed_tests),
        "number_of_failed_tests": len(failed_tests),
        "number_of_passed_user_utterances": passed_steps,
        "number_of_failed_user_utterances": len(steps) - passed_steps,
        "command_metrics": command_metrics,
        "names_of_passed_tests": passed_tests,
        "names_of_failed_tests": failed_tests,
        "failed_test_steps": [_rasa_failed_step(step, syntax) for step in steps if not step.passed],
    }


def _rasa_failed_step(step: RasaStep, syntax: Syntax) -> dict[str, Any]:
    file, _, name = (step.case.test_case or step.case.id).partition("::")
    return {
        "file": file,
        "test_case": name or file,
        "failed_user_utterance": step.case.user_message,
        "error_line": -1,  # not tracked per turn here; Rasa writes -1 when it does not know the line either
        "pass_status": False,
        "expected_commands": [format_commands([c], syntax) for c in step.case.expected],
        "predicted_commands": [
            {"component": step.component, "commands": [format_commands([c], syntax) for c in step.predicted]}
        ]
        if step.predicted
        else [],
    }


def model_metrics(
    outcomes: Sequence[Outcome],
    worst: int = 10,
    syntax: Syntax = Syntax.V2,
    runtime_turns: Sequence[Case] = (),
    component: str = "model",
) -> dict[str, Any]:
    """Everything the report shows for one model, as plain JSON data; `rasa` is the same turns counted as
    `rasa test du` counts them (with the payload and NLU turns in `runtime_turns`)."""
    predictions = [o.prediction for o in outcomes if o.prediction is not None]
    by_test: dict[str, list[bool]] = defaultdict(list)
    by_flow: dict[str, list[bool]] = defaultdict(list)
    for outcome in outcomes:
        if outcome.case.test_case is not None:
            by_test[outcome.case.test_case].append(outcome.correct)
        by_flow[outcome.case.flow].append(outcome.correct)
    emitted = sum(len(p.commands) + len(p.invalid) for p in predictions)
    invalid = [d for p in predictions for d in p.invalid]
    latencies = [p.latency_s for p in predictions]
    generated = sum(p.completion_tokens for p in predictions)
    correct = sum(o.correct for o in outcomes)
    return {
        "turns": len(outcomes),
        "correct_turns": correct,
        "turn_accuracy": _ratio(correct, len(outcomes)),
        "test_cases": len(by_test),
        "correct_test_cases": sum(all(results) for results in by_test.values()),
        "test_case_accuracy": _ratio(sum(all(results) for results in by_test.values()), len(by_test)),
        "errors": len(outcomes) - len(predictions),
        "empty_turns": sum(_empty(p) for p in predictions),
        "empty_rate": _ratio(sum(_empty(p) for p in predictions), len(predictions)),
        "unparseable_turns": sum(_unparseable(p) for p in predictions),
        "unparseable_rate": _ratio(sum(_unparseable(p) for p in predictions), len(predictions)),
        "truncated_turns": sum(p.finish_reason == "length" for p in predictions),
        "emitted_commands": emitted,
        "invalid_commands": len(invalid),
        "invalid_command_rate": _ratio(len(invalid), emitted),
        "turns_with_invalid_commands": sum(bool(p.invalid) for p in predictions),
        "hallucinated_flows": sum(_names_unknown_flow(d.reason) for d in invalid),
        "per_command": command_counts(outcomes),
        "per_flow": {
            flow: {"turns": len(results), "correct": sum(results), "accuracy": _ratio(sum(results), len(results))}
            for flow, results in sorted(by_flow.items())
        },
        "latency": {
            "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95),
            "mean_s": _ratio(sum(latencies), len(latencies)),
            "overhead_p50_ms": _ms(percentile([p.overhead_s for p in predictions], 0.5)),
            "prompt_tokens": sum(p.prompt_tokens for p in predictions),
            "completion_tokens": generated,
            "tokens_per_second": _ratio(generated, sum(latencies)),
            "per_turn_s": latencies,
        },
        "worst_turns": [_turn_record(o, syntax) for o in worst_outcomes(outcomes, worst)],
        "rasa": rasa_metrics(rasa_steps(outcomes, runtime_turns, component), syntax),
    }


def _empty(prediction: Prediction) -> bool:
    """An answer with no text at all: not unparseable (nothing was written to parse), counted apart."""
    return not prediction.raw_text.strip()


def _unparseable(prediction: Prediction) -> bool:
    return not _empty(prediction) and any(d.unparsed for d in prediction.dropped)


def _names_unknown_flow(reason: str) -> bool:
    return reason.startswith("unknown flow") or reason.startswith("clarify option")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def worst_outcomes(outcomes: Sequence[Outcome], count: int) -> list[Outcome]:
    """Wrong turns, most wrong commands first (failed calls count as missing everything), then the slowest."""

    def wrongness(outcome: Outcome) -> tuple[float, float]:
        expected, predicted = _multiset(outcome.case.expected, outcome.key), _multiset(outcome.predicted, outcome.key)
        missed = sum((expected - predicted).values()) + sum((predicted - expected).values())
        dropped = len(outcome.prediction.dropped) if outcome.prediction else 1
        return (missed + dropped, outcome.prediction.latency_s if outcome.prediction else 0.0)

    wrong = [o for o in outcomes if not o.correct]
    return sorted(wrong, key=wrongness, reverse=True)[:count]


def _turn_record(outcome: Outcome, syntax: Syntax) -> dict[str, Any]:
    prediction = outcome.prediction
    return {
        "id": outcome.case.id,
        "flow": outcome.case.flow,
        "user_message": outcome.case.user_message,
        "expected": format_commands(outcome.case.expected, syntax),
        "predicted": format_commands(outcome.predicted, syntax),
        "raw_answer": prediction.raw_text if prediction else None,
        "dropped": [
            {"item": d.item if isinstance(d.item, str) else format_commands([d.item], syntax), "reason": d.reason}
            for d in (prediction.dropped if prediction else ())
        ],
        "error": outcome.error,
        "latency_s": prediction.latency_s if prediction else None,
        "prompt": prediction.prompt if prediction else outcome.case.prompt,
    }


def passes(metrics: dict[str, Any], threshold: float, metric: str = "turn_accuracy") -> bool:
    value = metrics.get(metric)
    return value is not None and value >= threshold


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a local folder (or hub id), or an OpenAI-compatible endpoint and the model name there."""

    model: str | None = None
    base_model: str | None = None
    endpoint: str | None = None
    endpoint_model: str | None = None
    label: str | None = None
    api_key_env: str | None = None

    @property
    def description(self) -> str:
        return self.model if self.model is not None else f"{self.endpoint_model} at {self.endpoint}"

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return Path(self.model).name if self.model is not None else str(self.endpoint_model)


def default_api_key_envs(endpoint: str) -> tuple[str, ...]:
    """The provider's usual key variables for an endpoint without --api-key-env (the same names as LLM configs use):
    none on a loopback host (a local `recipe serve` or vLLM), Azure's on *.openai.azure.com, else OpenAI's and then
    the self-hosted one, since OpenAI-compatible servers elsewhere mostly take one of them."""
    host = (urlsplit(endpoint).hostname or "").lower()
    if is_loopback(host):
        return ()
    if host.endswith(".openai.azure.com"):
        return ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY")
    if host == "api.openai.com":
        return ("OPENAI_API_KEY",)
    return ("OPENAI_API_KEY", "SELF_HOSTED_API_KEY")


def _api_key(spec: ModelSpec) -> str | None:
    from recipe.llm import key_from_environment, key_from_named_variable

    if spec.api_key_env:
        return key_from_named_variable(spec.api_key_env)
    names = default_api_key_envs(spec.endpoint or "")
    key = key_from_environment(names)
    if key is None and "SELF_HOSTED_API_KEY" not in names and names:
        # OpenAI and Azure answer no key with a 401, after the local models are loaded: say so now. A server of
        # one's own elsewhere may well take no key.
        raise ConfigError(
            f"--endpoint {spec.endpoint}: no API key; set {' or '.join(names)}, or name the variable "
            "holding it with --api-key-env VAR after the --endpoint"
        )
    return key


def build_generator(
    spec: ModelSpec,
    project: Project,
    *,
    template_path: Path | None = None,
    syntax: str | None = None,
    constrained: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    use_completions: bool = False,
    threads: int | None = None,
) -> CommandGenerator:
    """The runtime generator for one model spec, with the template and syntax it was trained with."""
    backend: Backend
    if spec.model is not None:
        backend = LocalModelBackend(
            spec.model, base_model=spec.base_model, max_new_tokens=max_tokens, threads=threads, name=spec.name
        )
    elif spec.endpoint is not None and spec.endpoint_model is not None:
        backend = OpenAIBackend(
            spec.endpoint,
            spec.endpoint_model,
            api_key=_api_key(spec),
            max_tokens=max_tokens,
            use_completions=use_completions,
            name=spec.name,
        )
    else:
        raise ConfigError("each --endpoint needs its --endpoint-model NAME")
    return CommandGenerator.for_model(
        project, backend, template_path=template_path, syntax=syntax, constrained=constrained
    )


def check_inputs(project: Project, inputs: Sequence[str]) -> None:
    """Fail on a missing or unreadable input before any model is loaded."""
    from recipe.testcases import load_tests

    rows = [spec for spec in inputs if spec.endswith(".jsonl")]
    tests = [spec for spec in inputs if not spec.endswith(".jsonl")]
    for spec in rows:
        _check_jsonl(Path(spec))
        _read_rows(Path(spec))
    if tests:
        load_tests(tests, project)


def load_cases(
    project: Project,
    inputs: Sequence[str],
    policy: DatetimePolicy,
    syntax: Syntax,
    include_derived: bool = False,
    left_out: list[tuple[str, str]] | None = None,
    runtime_turns: list[Case] | None = None,
) -> list[Case]:
    """`.jsonl` inputs are split rows; anything else is a test file, folder or `file::test case`. Float slots' values
    are scored as numbers. The ids of derived turns left out (without `include_derived`) are appended to `left_out`,
    payload and NLU turns with written commands to `runtime_turns` (for Rasa's counting)."""
    rows = [spec for spec in inputs if spec.endswith(".jsonl")]
    tests = [spec for spec in inputs if not spec.endswith(".jsonl")]
    cases = [case for spec in rows for case in cases_from_jsonl(Path(spec), syntax, project, left_out)]
    answered_elsewhere: list[Case] = []
    if tests:
        cases += cases_from_tests(project, tests, policy, include_derived, left_out, answered_elsewhere)
    float_slots = frozenset(name for name, slot in project.domain.slots.items() if slot.type == "float")
    if runtime_turns is not None:
        runtime_turns += [replace(case, float_slots=float_slots) for case in answered_elsewhere]
    return [replace(case, float_slots=float_slots) for case in cases]


def left_out_summary(cases: Sequence[Case], left_out: Sequence[tuple[str, str]]) -> LeftOut:
    """How many turns were left out and why, and how many test cases had no turn scored because of derived turns."""
    scored = {case.test_case for case in cases}
    derived = [turn_id for turn_id, why in left_out if why == "assertions"]
    return LeftOut(
        turns=len(derived),
        test_cases=len({i.rsplit("#", 1)[0] for i in derived} - scored),
        payload_turns=sum(why == "payload" for _, why in left_out),
        nlu_turns=sum(why == "nlu" for _, why in left_out),
        rasa_version_turns=sum(why == "rasa-version" for _, why in left_out),
    )


def evaluate_model(
    spec: ModelSpec,
    generator: CommandGenerator,
    cases: Sequence[Case],
    *,
    concurrency: int = 1,
    worst: int = 10,
    progress: Callable[[], None] | None = None,
    runtime_turns: Sequence[Case] = (),
) -> ModelResult:
    outcomes = run_model(generator, cases, concurrency=concurrency, progress=progress)
    setup = generator.setup
    return ModelResult(
        label=spec.name,
        description=spec.description,
        template=setup.template.path,
        template_sha256=setup.template.sha256,
        syntax=setup.syntax.value,
        constrained=generator.constrained,
        warnings=setup.warnings,
        metrics=model_metrics(outcomes, worst, setup.syntax, runtime_turns, spec.name),
    )


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelResult:
    """One model's evaluation: what was run (model, template, syntax, decoding) and `model_metrics`' numbers; what
    `recipe.evaluate_report` writes."""

    label: str
    description: str  # model folder or endpoint + name
    template: str
    template_sha256: str
    syntax: str
    constrained: bool
    warnings: tuple[str, ...]
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------- the command

Scoring = Literal["recipe", "rasa"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `recipe evaluate` needs; the single source of its defaults (the CLI's are checked against these)."""

    inputs: tuple[str, ...]  # test files or folders, FILE::TEST CASE, or val.jsonl split files
    models: tuple[ModelSpec, ...]
    out: Path = Path("evaluation")
    template_path: Path | None = None  # ignored (with a warning) when every input is .jsonl: already rendered
    syntax: str | None = None
    constrained: bool = False
    scoring: Scoring = "recipe"
    include_derived: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    use_completions: bool = False
    concurrency: int = 1  # endpoint calls in flight per model; local models run one turn at a time
    threads: int | None = None
    worst: int = 10
    fail_under: float | None = None
    datetime: DatetimePolicy = DatetimePolicy()  # as asked; a model trained without the date line turns it off
    show_progress: bool = True

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("no model to evaluate: give --model DIR and/or --endpoint URL --endpoint-model NAME")
        if self.concurrency < 1 or self.max_tokens < 1 or self.worst < 0:
            raise ConfigError("--concurrency and --max-tokens must be at least 1, --worst at least 0")
        labels = [spec.name for spec in self.models]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"two models share a label ({', '.join(labels)}); name them with --label")


@dataclass(frozen=True)
class Evaluation:
    results: tuple[ModelResult, ...]
    cases: tuple[Case, ...]
    left_out: LeftOut

    def below(self, threshold: float, scoring: Scoring) -> list[str]:
        """The labels of the models under `threshold`: turn accuracy, or Rasa's user-utterance accuracy."""

        def accuracy(result: ModelResult) -> dict[str, Any]:
            if scoring == "rasa":
                return {"turn_accuracy": result.metrics["rasa"]["accuracy"]["user_utterances"]}
            return result.metrics

        return [result.label for result in self.results if not passes(accuracy(result), threshold)]


def evaluate(project: Project, config: EvaluateConfig, warn: Callable[[str], None] = log.warning) -> Evaluation:
    """Every model of `config` over the cases of its inputs. Inputs are checked and every generator is built before
    any model runs, so a missing path, model or key fails in seconds; `warn` hears what the user should know first."""
    from tqdm import tqdm

    config.validate()
    check_inputs(project, config.inputs)
    template_path = config.template_path
    if template_path is not None and all(spec.endswith(".jsonl") for spec in config.inputs):
        warn("--prompt-template is ignored for .jsonl inputs: their prompts are already rendered")
        template_path = None
    generators = [
        build_generator(
            spec,
            project,
            template_path=template_path,
            syntax=config.syntax,
            constrained=config.constrained,
            max_tokens=config.max_tokens,
            use_completions=config.use_completions,
            threads=config.threads,
        )
        for spec in config.models
    ]
    info = next((found for g in generators if (found := getattr(g.backend, "training_info", None))), None) or {}
    trained_with_date = info.get("include_date_time", project.config.include_date_time)
    if not config.datetime.include and trained_with_date is True:
        warn(
            "warning: --no-datetime, but the model was trained on prompts with the date and time "
            "(include_date_time: true): the prompts will differ from training"
        )
    policy = replace(config.datetime, include=config.datetime.include and trained_with_date is not False)
    skipped: list[tuple[str, str]] = []
    runtime_turns: list[Case] = []  # payload and NLU turns: only Rasa's counting scores them
    cases = load_cases(
        project, config.inputs, policy, generators[0].syntax, config.include_derived, skipped, runtime_turns
    )
    if not cases:
        raise ConfigError(
            f"{', '.join(config.inputs)}: no turns with commands to score (DU tests give `commands:`; "
            "use --include-derived for turns whose commands follow from assertions)"
        )
    results = []
    for spec, generator in zip(config.models, generators):
        with tqdm(total=len(cases), desc=spec.name, unit="turn", disable=not config.show_progress) as bar:
            results.append(
                evaluate_model(
                    spec,
                    generator,
                    cases,
                    concurrency=config.concurrency if spec.endpoint else 1,
                    worst=config.worst,
                    progress=lambda: bar.update(1),
                    runtime_turns=runtime_turns,
                )
            )
    return Evaluation(tuple(results), tuple(cases), left_out_summary(cases, skipped))
