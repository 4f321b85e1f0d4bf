"""Both countings of `recipe evaluate` on hand-computed turns: ours (multisets per turn; payload turns and the
validator's drops left out) and `rasa test du`'s (`--scoring rasa`: steps with written commands, payload turns
included, drops counted as false positives, nothing parsed = `cannot handle`, presence instead of multisets)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from recipe.cli import main
from recipe.command_validation import Dropped
from recipe.commands import (
    CancelFlow,
    ChitChat,
    Clarify,
    Command,
    SetSlot,
    StartFlow,
)
from recipe.evaluate import Case, Outcome, model_metrics
from recipe.evaluate_report import rasa_report_name
from recipe.runtime import Prediction
from recipe.testing.openai_server import ScriptedOpenAIServer

REPO = Path(__file__).resolve().parent.parent


def _case(test: str, turn: int, expected: list[Command], source: str = "test") -> Case:
    return Case(
        id=f"t.yml::{test}#{turn}",
        test_case=f"t.yml::{test}",
        user_message=f"{test} turn {turn}",
        expected=tuple(expected),
        flow="f",
        source=source,
    )


def _outcome(case: Case, raw: str, kept: list[Command], dropped: list[Dropped] = ()) -> Outcome:
    prediction = Prediction(
        prompt="p",
        raw_text=raw,
        commands=tuple(kept),
        dropped=tuple(dropped),
        latency_s=0.1,
        overhead_s=0.0,
        prompt_tokens=10,
        completion_tokens=2,
        finish_reason="stop",
    )
    return Outcome(case, prediction)


def _hand_made() -> tuple[list[Outcome], list[Case]]:
    book, city, stars = StartFlow("book_hotel"), SetSlot("hotel_city", "Lisbon"), SetSlot("hotel_stars", "six")
    outcomes = [
        # T1#1: the flow right, a categorical value outside the slot's values dropped by the validator
        _outcome(
            _case("T1", 1, [book, city]),
            "start flow book_hotel\nset slot hotel_stars six",
            [book],
            [Dropped(stars, "value `six` is not one of hotel_stars's values")],
        ),
        # T1#2: expects nothing, answers nothing: ours scores it (correct), Rasa has no step for it
        _outcome(_case("T1", 2, []), "", []),
        # T2#1: an empty answer
        _outcome(_case("T2", 1, [CancelFlow()]), "", []),
        # T3#1: a duplicate chitchat; T3#2: clarify written without options
        _outcome(_case("T3", 1, [ChitChat()]), "chitchat\nchitchat", [ChitChat(), ChitChat()]),
        _outcome(_case("T3", 2, [Clarify(())]), "disambiguate flows a b", [Clarify(("a", "b"))]),
    ]
    payload = [_case("T1", 3, [SetSlot("confirm", "True")], source="payload")]
    return outcomes, payload


def test_default_counting_by_hand():
    outcomes, payload = _hand_made()
    m = model_metrics(outcomes, runtime_turns=payload)
    assert (m["turns"], m["correct_turns"]) == (5, 1)  # only T1#2
    assert (m["test_cases"], m["correct_test_cases"]) == (3, 0)
    c = {kind: (v["tp"], v["fp"], v["fn"]) for kind, v in m["per_command"].items()}
    assert c == {
        "start flow": (1, 0, 0),
        "set slot": (0, 0, 1),
        "set slot (name only)": (0, 0, 1),
        "cancel flow": (0, 0, 1),
        "chitchat": (1, 1, 0),
        "clarify": (0, 1, 1),
    }
    # empty answers are empty, not unparseable
    assert (m["empty_turns"], m["unparseable_turns"], m["invalid_commands"]) == (2, 0, 1)


def test_rasa_counting_by_hand():
    outcomes, payload = _hand_made()
    r = model_metrics(outcomes, runtime_turns=payload, component="student")["rasa"]
    # steps: T1#1 (fails), T1#3 payload (passes), T2#1 (fails: cannot handle), T3#1 (fails: 2 vs 1), T3#2 (passes)
    assert (r["number_of_passed_user_utterances"], r["number_of_failed_user_utterances"]) == (2, 3)
    assert r["accuracy"] == {"test_cases": 0.0, "user_utterances": 0.4}
    assert (r["number_of_passed_tests"], r["number_of_failed_tests"]) == (0, 3)
    c = {name: (v["tp"], v["fp"], v["fn"], v["total_count"]) for name, v in r["command_metrics"].items()}
    assert c == {
        "start_flow": (1, 0, 0, 1),
        "set_slot": (1, 1, 1, 2),
        "cancel_flow": (0, 0, 1, 1),
        "cannot_handle": (0, 1, 0, 0),
        "chitchat": (1, 0, 0, 1),
        "clarify": (1, 0, 0, 1),
    }
    slot = r["command_metrics"]["set_slot"]
    assert (slot["precision"], slot["recall"], slot["f1_score"]) == (0.5, 0.5, 0.5)
    cancel = r["command_metrics"]["cancel_flow"]
    assert (cancel["precision"], cancel["recall"], cancel["f1_score"]) == (0.0, 0.0, 0.0)  # Rasa's 0/0 is 0.0
    assert r["names_of_failed_tests"] == ["t.yml::T1", "t.yml::T2", "t.yml::T3"]
    failed = {(s["test_case"], s["failed_user_utterance"]): s for s in r["failed_test_steps"]}
    assert set(failed) == {("T1", "T1 turn 1"), ("T2", "T2 turn 1"), ("T3", "T3 turn 1")}
    assert failed[("T1", "T1 turn 1")]["expected_commands"] == ["start flow book_hotel", "set slot hotel_city Lisbon"]
    assert failed[("T1", "T1 turn 1")]["predicted_commands"] == [
        {"component": "student", "commands": ["start flow book_hotel", "set slot hotel_stars six"]}
    ]
    assert failed[("T2", "T2 turn 1")]["predicted_commands"][0]["commands"] == ["cannot handle"]


def test_a_passing_test_case_counts_all_its_commands_as_true_positives():
    # [A, A] expected, [A, B] predicted: as long, and every expected command present, so Rasa passes the step
    a, b = SetSlot("x", "1"), SetSlot("y", "2")
    outcome = _outcome(_case("T", 1, [a, a]), "set slot x 1\nset slot y 2", [a, b])
    r = model_metrics([outcome])["rasa"]
    assert r["accuracy"]["user_utterances"] == 1.0
    assert r["command_metrics"]["set_slot"] == {
        "tp": 2,
        "fp": 0,
        "fn": 0,
        "precision": 1.0,
        "recall": 1.0,
        "f1_score": 1.0,
        "total_count": 2,
    }
    assert model_metrics([outcome])["correct_turns"] == 0  # ours: multisets differ


def test_scoring_rasa_writes_the_results_file_and_the_report_shows_both(tmp_path, capsys):
    """A DU test file with a button payload turn, through the real CLI and a scripted endpoint answering every turn
    with `start flow book_hotel`."""
    tests = tmp_path / "du.yml"
    tests.write_text(
        "test_cases:\n"
        "  - test_case: book\n"
        "    steps:\n"
        "      - user: I need a hotel\n"
        "        commands:\n"
        "          - start flow book_hotel\n"
        "      - user: /SetSlots(hotel_city=Lisbon)\n"
        "        commands:\n"
        "          - set slot hotel_city Lisbon\n"
        "      - user: and cancel it\n"
        "        commands:\n"
        "          - cancel flow\n",
        encoding="utf-8",
    )
    out = tmp_path / "eval"
    with ScriptedOpenAIServer(lambda body: "start flow book_hotel") as server:
        code = main(
            [
                "evaluate",
                str(tests),
                "--endpoint",
                server.base_url,
                "--endpoint-model",
                "m",
                "--label",
                "m",
                "--project",
                str(REPO),
                "-o",
                str(out),
                "--no-progress",
                "--scoring",
                "rasa",
                "--fail-under",
                "50%",
            ]
        )
    assert code == 0  # 2 of 3 steps (the payload turn answered by the runtime): 67 %
    printed = capsys.readouterr().out
    assert "(as rasa test du): user utterances 66.7% (2/3)" in printed and "turn accuracy 50.0% (1/2)" in printed
    assert "left out 1 payload turn(s)" in printed
    results = yaml.safe_load((out / rasa_report_name("m")).read_text(encoding="utf-8"))
    assert list(results) == [
        "accuracy",
        "number_of_passed_tests",
        "number_of_failed_tests",
        "number_of_passed_user_utterances",
        "number_of_failed_user_utterances",
        "command_metrics",
        "names_of_passed_tests",
        "names_of_failed_tests",
        "failed_test_steps",
    ]
    assert results["command_metrics"]["start_flow"]["fp"] == 1 and results["command_metrics"]["cancel_flow"]["fn"] == 1
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "as `rasa test du`" in report and "| start_flow |" in report
    metrics = json.loads((out / "report.json").read_text(encoding="utf-8"))["models"][0]["metrics"]
    assert metrics["rasa"]["command_metrics"]["set_slot"] == {
        "tp": 1,
        "fp": 0,
        "fn": 0,
        "precision": 1.0,
        "recall": 1.0,
        "f1_score": 1.0,
        "total_count": 1,
    }
    assert metrics["turn_accuracy"] == 0.5 and "set slot" not in metrics["per_command"]


def test_what_rasas_parser_drops_itself_is_not_predicted_there():
    """`start flow` of an unknown flow never leaves Rasa's command parser: nothing parsed, so `cannot handle`."""
    unknown = StartFlow("book_spaceship")
    outcome = _outcome(
        _case("T", 1, [StartFlow("book_hotel")]),
        "start flow book_spaceship",
        [],
        [Dropped(unknown, "unknown flow `book_spaceship`; expected one of: book_hotel")],
    )
    r = model_metrics([outcome])["rasa"]
    assert {n: (v["tp"], v["fp"], v["fn"]) for n, v in r["command_metrics"].items()} == {
        "start_flow": (0, 0, 1),
        "cannot_handle": (0, 1, 0),
    }
