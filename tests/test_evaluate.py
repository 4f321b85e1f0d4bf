"""`recipe evaluate` on the bundled example's validation tests and on val.jsonl rows: the metric arithmetic for a
perfect model, a model that always starts the same flow and one that emits garbage, checked against counts made
here from the test files; a hand-computed four-row case; the report files; and the command line's errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from rt_artifacts import finetuned_folder

from recipe.backends import OpenAIBackend
from recipe.cli import main
from recipe.commands import StartFlow, Syntax, format_commands
from recipe.evaluate import NAME_ONLY, load_cases, percentile
from recipe.project import load_project
from recipe.prompt import PROMPTS_DIR, DatetimePolicy, load_template
from recipe.runtime import CommandGenerator
from recipe.testcases import all_test_cases, load_tests
from recipe.testing.openai_server import Reply, ScriptedOpenAIServer, prompt_of
from recipe.tracker import is_button_payload
from recipe.types import UserStep

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """A copy of the example assistant with prepare-data's offline output in `out/` (validation suites inside the
    project, where their conftest.yml fixtures are found)."""
    root = tmp_path_factory.mktemp("assistant")
    for folder in ("flows", "e2e_tests"):
        shutil.copytree(REPO / folder, root / folder)
    assert (
        main(
            [
                "prepare-data",
                str(root / "e2e_tests"),
                "--project",
                str(root),
                "--offline",
                "--num-rephrases",
                "0",
                "-o",
                str(root / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def validation(example) -> Path:
    return example / "out" / "4_train_test_split" / "e2e_tests" / "validation"


@pytest.fixture(scope="module")
def gold(example, validation) -> list[tuple[str, tuple]]:
    """(test case id, written commands) of every scored turn, read straight from the validation files. A turn that
    hands over to a human (no command in Rasa Pro 3.16+, the default target) and the turns after it are not scored."""
    project = load_project(example)
    turns = []
    for test_case in all_test_cases(load_tests([str(validation)], project)):
        for step in test_case.steps:
            if isinstance(step, UserStep) and any(c.kind == "human handoff" for c in step.commands or []):
                break
            if isinstance(step, UserStep) and step.commands is not None and not is_button_payload(step.text):
                turns.append((test_case.id, tuple(step.commands)))
    assert len(turns) > 20 and len({test for test, _ in turns}) > 3
    return turns


def _evaluate(example: Path, out: Path, inputs: list[str], models: list[str], *extra: str) -> tuple[int, dict]:
    code = main(["evaluate", *inputs, *models, "--project", str(example), "-o", str(out), "--no-progress", *extra])
    report = json.loads((out / "report.json").read_text(encoding="utf-8")) if (out / "report.json").exists() else {}
    return code, report


def _metrics(report: dict, index: int = 0) -> dict:
    return report["models"][index]["metrics"]


def _perfect_answers(example: Path, validation: Path) -> dict[str, str]:
    """Prompt -> the test's commands: what a perfect model answers (prompts rendered as evaluate renders them)."""
    project = load_project(example)
    generator = CommandGenerator.for_model(project, OpenAIBackend("http://127.0.0.1:1/v1", "unused"))
    cases = load_cases(project, [str(validation)], DatetimePolicy(), Syntax.V2)
    return {generator.render(c.state, c.user_message, c.when): format_commands(c.expected, Syntax.V2) for c in cases}


def test_perfect_model_scores_everything(example, validation, gold, tmp_path):
    answers = _perfect_answers(example, validation)
    with ScriptedOpenAIServer(lambda body: answers[prompt_of(body)]) as server:
        code, report = _evaluate(
            example,
            tmp_path,
            [str(validation)],
            ["--endpoint", server.base_url, "--endpoint-model", "teacher"],
            "--fail-under",
            "100%",
        )
    assert code == 0
    metrics = _metrics(report)
    assert (metrics["turns"], metrics["correct_turns"], metrics["turn_accuracy"]) == (len(gold), len(gold), 1.0)
    tests = {test for test, _ in gold}
    assert (metrics["test_cases"], metrics["correct_test_cases"], metrics["test_case_accuracy"]) == (
        len(tests),
        len(tests),
        1.0,
    )
    kinds = Counter(command.kind for _, commands in gold for command in commands)
    slot_count = kinds["set slot"]
    assert set(metrics["per_command"]) == set(kinds) | ({NAME_ONLY} if slot_count else set())
    for kind, count in kinds.items():
        assert metrics["per_command"][kind] == {
            "tp": count,
            "fp": 0,
            "fn": 0,
            "support": count,
            "precision": 1.0,
            "recall": 1.0,
            "f1": 1.0,
        }
    assert metrics["per_command"][NAME_ONLY]["tp"] == slot_count
    assert metrics["unparseable_rate"] == 0 and metrics["invalid_command_rate"] == 0 and metrics["errors"] == 0
    assert all(flow["accuracy"] == 1.0 for flow in metrics["per_flow"].values())
    assert sum(flow["turns"] for flow in metrics["per_flow"].values()) == len(gold)
    assert metrics["worst_turns"] == []
    assert metrics["emitted_commands"] == sum(kinds.values())


def test_model_that_always_starts_the_same_flow(example, validation, gold, tmp_path):
    flow = "book_rental_car"
    with ScriptedOpenAIServer(lambda body: f"start flow {flow}") as server:
        code, report = _evaluate(
            example,
            tmp_path,
            [str(validation)],
            ["--endpoint", server.base_url, "--endpoint-model", "one-trick"],
            "--fail-under",
            "0.5",
        )
    assert code == 1  # below the bar
    metrics = _metrics(report)
    exactly = [test for test, commands in gold if commands == (StartFlow(flow),)]
    assert metrics["correct_turns"] == len(exactly)
    by_test = Counter(test for test, _ in gold)
    assert metrics["correct_test_cases"] == sum(Counter(exactly)[test] == n for test, n in by_test.items())
    starts = [c for _, commands in gold for c in commands if isinstance(c, StartFlow)]
    hits = sum(StartFlow(flow) in commands for _, commands in gold)
    assert hits > len(exactly) > 0  # the flow is started alone and with slots: both kinds of turn are covered
    assert metrics["per_command"]["start flow"] == {
        "tp": hits,
        "fp": len(gold) - hits,
        "fn": len(starts) - hits,
        "support": len(starts),
        "precision": hits / len(gold),
        "recall": hits / len(starts),
        "f1": 2 * hits / (len(gold) + len(starts)),
    }
    others = Counter(c.kind for _, commands in gold for c in commands if not isinstance(c, StartFlow))
    for kind, count in others.items():
        assert metrics["per_command"][kind] == {
            "tp": 0,
            "fp": 0,
            "fn": count,
            "support": count,
            "precision": None,
            "recall": 0.0,
            "f1": 0.0,
        }
    assert metrics["unparseable_rate"] == 0 and metrics["invalid_commands"] == 0
    assert len(metrics["worst_turns"]) == min(10, len(gold) - len(exactly))


def test_model_that_emits_garbage_or_unknown_flows(example, validation, gold, tmp_path):
    def answer(body):  # garbage on odd-length prompts, a hallucinated flow on the others
        return "Sure! Let me book that." if len(prompt_of(body)) % 2 else "start flow book_spaceship"

    with ScriptedOpenAIServer(answer) as server:
        code, report = _evaluate(
            example, tmp_path, [str(validation)], ["--endpoint", server.base_url, "--endpoint-model", "garbage"]
        )
        garbage = sum(len(request.prompt) % 2 for request in server.requests)
    assert code == 0  # no --fail-under: a report, not a verdict
    metrics = _metrics(report)
    assert 0 < garbage < len(gold)
    assert metrics["correct_turns"] == 0 and metrics["correct_test_cases"] == 0
    assert metrics["unparseable_turns"] == garbage
    assert metrics["unparseable_rate"] == garbage / len(gold)
    assert (
        metrics["invalid_commands"]
        == metrics["emitted_commands"]
        == metrics["hallucinated_flows"]
        == len(gold) - garbage
    )
    assert metrics["invalid_command_rate"] == 1.0
    kinds = Counter(c.kind for _, commands in gold for c in commands)
    for kind, count in kinds.items():
        assert (
            metrics["per_command"][kind]["tp"],
            metrics["per_command"][kind]["fp"],
            metrics["per_command"][kind]["fn"],
        ) == (0, 0, count)
    worst = metrics["worst_turns"][0]
    assert worst["raw_answer"] in ("Sure! Let me book that.", "start flow book_spaceship") and worst["dropped"]


HAND_ROWS = [
    ("P1", "start flow book_hotel\nset slot hotel_city Lisbon", "start flow book_hotel\nset slot hotel_city lisbon"),
    ("P2", "set slot num_nights 3", "set slot num_nights 4"),
    ("P3", "cancel flow", "cancel flow\nofftopic"),
    (
        "P4",
        "disambiguate flows book_hotel book_rental_car",
        "disambiguate flows book_rental_car book_hotel\nstart flow book_spaceship",
    ),
]  # (prompt, expected completion, what the model answers)


def test_hand_computed_val_rows(example, tmp_path):
    rows = tmp_path / "val.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c, _ in HAND_ROWS))
    answers = {p: a for p, _, a in HAND_ROWS}
    with ScriptedOpenAIServer(lambda body: Reply.text(answers[prompt_of(body)], completion_tokens=5)) as server:
        code, report = _evaluate(
            example, tmp_path / "out", [str(rows)], ["--endpoint", server.base_url, "--endpoint-model", "student"]
        )
    assert code == 0
    m = _metrics(report)
    # Row 1 is right (values compare case-folded), 2 has a wrong value, 3 has an extra line that is not a command
    # (ignored, counted unparseable), 4 has a hallucinated flow (dropped as invalid) and a right clarification.
    assert (m["turns"], m["correct_turns"], m["turn_accuracy"]) == (4, 3, 0.75)
    assert (m["test_cases"], m["test_case_accuracy"]) == (0, None)  # rows without test names
    assert (m["unparseable_turns"], m["unparseable_rate"]) == (1, 0.25)
    assert (m["emitted_commands"], m["invalid_commands"], m["hallucinated_flows"]) == (6, 1, 1)
    assert m["invalid_command_rate"] == pytest.approx(1 / 6)
    per = m["per_command"]
    assert per["start flow"] == {"tp": 1, "fp": 0, "fn": 0, "support": 1, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert per["set slot"] == {"tp": 1, "fp": 1, "fn": 1, "support": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert per[NAME_ONLY] == {"tp": 2, "fp": 0, "fn": 0, "support": 2, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert per["cancel flow"]["tp"] == per["clarify"]["tp"] == 1
    assert set(per) == {"start flow", "set slot", NAME_ONLY, "cancel flow", "clarify"}
    assert m["per_flow"] == {
        "(no flow)": {"turns": 3, "correct": 2, "accuracy": 2 / 3},
        "book_hotel": {"turns": 1, "correct": 1, "accuracy": 1.0},
    }
    [worst] = m["worst_turns"]
    assert (worst["id"], worst["expected"], worst["predicted"]) == (
        "val.jsonl:2",
        "set slot num_nights 3",
        "set slot num_nights 4",
    )
    latency = m["latency"]
    assert latency["completion_tokens"] == 20 and len(latency["per_turn_s"]) == 4
    assert latency["tokens_per_second"] == pytest.approx(20 / sum(latency["per_turn_s"]))
    assert latency["p50_s"] == pytest.approx(percentile(latency["per_turn_s"], 0.5))
    assert latency["p50_s"] <= latency["p95_s"] <= max(latency["per_turn_s"])


def test_side_by_side_report_files(example, tmp_path):
    rows = tmp_path / "val.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}) + "\n"
            for p, c, _ in HAND_ROWS
        )
    )
    answers = {p: c for p, c, _ in HAND_ROWS}
    with (
        ScriptedOpenAIServer(lambda body: answers[prompt_of(body)]) as teacher,
        ScriptedOpenAIServer(lambda body: "offtopic reply") as student,
    ):
        code, report = _evaluate(
            example,
            tmp_path / "out",
            [str(rows)],
            [
                "--endpoint",
                teacher.base_url,
                "--endpoint-model",
                "gpt-4o",
                "--label",
                "teacher",
                "--endpoint",
                student.base_url,
                "--endpoint-model",
                "cmdgen",
                "--label",
                "student",
            ],
            "--fail-under",
            "0.9",
        )
    assert code == 1  # the student is below 90 %
    assert [model["label"] for model in report["models"]] == ["teacher", "student"]
    assert _metrics(report, 0)["turn_accuracy"] == 1.0 and _metrics(report, 1)["turn_accuracy"] == 0.0
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| metric | teacher | student |" in markdown
    assert "| turn accuracy | 100.0% (4/4) | 0.0% (0/4) |" in markdown
    assert "## Worst turns: student" in markdown and "<summary>prompt</summary>" in markdown
    for plot in ("f1_per_command.png", "latency.png"):
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in markdown


def test_local_model_over_val_rows(example, tmp_path):
    template = load_template(PROMPTS_DIR / "command_prompt_v2.jinja2")
    model = finetuned_folder(tmp_path / "models", template)
    rows = example / "out" / "4_train_test_split" / "ft_splits" / "val.jsonl"
    subset = tmp_path / "val3.jsonl"
    subset.write_text("".join(rows.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    code, report = _evaluate(
        example,
        tmp_path / "out",
        [str(subset)],
        ["--model", str(model), "--label", "tiny"],
        "--max-tokens",
        "8",
        "--threads",
        "1",
    )
    assert code == 0
    m = _metrics(report)
    assert m["turns"] == 3 and m["correct_turns"] == 0 and m["unparseable_rate"] == 1.0  # untrained: garbage
    assert m["truncated_turns"] == 3 and m["latency"]["completion_tokens"] == 24
    assert m["latency"]["tokens_per_second"] > 0 and m["latency"]["p50_s"] > 0
    assert report["models"][0]["template_sha256"] == template.sha256


def test_assertion_derived_turns_only_on_request(example, tmp_path, capsys):
    e2e = str(example / "e2e_tests" / "e2e" / "assertion_checks.yml")
    with ScriptedOpenAIServer(lambda body: "offtopic reply") as server:
        models = ["--endpoint", server.base_url, "--endpoint-model", "m"]
        code, _ = _evaluate(example, tmp_path / "a", [e2e], models)
        assert code == 2 and "--include-derived" in capsys.readouterr().err
        code, report = _evaluate(example, tmp_path / "b", [e2e], models, "--include-derived")
    assert code == 0 and report["case_sources"] == {"assertions": _metrics(report)["turns"]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no model to evaluate"),
        (["--endpoint", "http://127.0.0.1:9/v1"], "--endpoint-model"),
        (["--model", "/no/such/model"], "model folder not found"),
        (["--endpoint", "http://127.0.0.1:9/v1", "--endpoint-model", "a", "--fail-under", "1.5"], "between 0 and 1"),
        (
            [
                "--endpoint",
                "http://a/v1",
                "--endpoint-model",
                "m",
                "--endpoint",
                "http://b/v1",
                "--endpoint-model",
                "m",
            ],
            "share a label",
        ),
    ],
)
def test_command_line_mistakes(example, tmp_path, capsys, argv, message):
    assert (
        main(["evaluate", str(example / "e2e_tests" / "hotels"), "--project", str(example), "-o", str(tmp_path), *argv])
        == 2
    )
    assert message in capsys.readouterr().err


def test_model_options_must_follow_their_model(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "e2e_tests", "--label", "x", "--model", "m"])
    assert "must follow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "e2e_tests", "--model", "m", "--endpoint-model", "x"])
    assert "must follow a --endpoint" in capsys.readouterr().err


def test_unreachable_endpoint_stops_the_run(example, tmp_path, capsys):
    with ScriptedOpenAIServer(lambda body: "x") as server:
        dead = server.base_url
    code, _ = _evaluate(
        example, tmp_path, [str(example / "e2e_tests" / "hotels")], ["--endpoint", dead, "--endpoint-model", "m"]
    )
    assert code == 2 and "cannot connect" in capsys.readouterr().err


def test_percentile_interpolates_like_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)
    assert percentile([7.0], 0.95) == 7.0 and percentile([], 0.5) is None


def test_bad_val_rows_are_errors_at_their_line(example, tmp_path, capsys):
    rows = tmp_path / "val.jsonl"
    rows.write_text(
        json.dumps({"prompt": "p", "completion": "start flow book_hotel"})
        + "\n"
        + json.dumps({"prompt": "q", "completion": "book it!"})
        + "\n"
    )
    models = ["--endpoint", "http://127.0.0.1:9/v1", "--endpoint-model", "m"]
    assert _evaluate(example, tmp_path / "out", [str(rows)], models)[0] == 2
    assert f"{rows}:2: completion line `book it!` is not a command" in capsys.readouterr().err
    assert _evaluate(example, tmp_path / "out", [str(tmp_path / "missing.jsonl")], models)[0] == 2
    assert "file not found" in capsys.readouterr().err


def test_float_slots_compare_as_numbers_other_slots_as_text(example, tmp_path):
    rows = tmp_path / "llm_ft_data.jsonl"  # prepare-data's {"prompt", "output"} rows: output is the completion
    rows.write_text(
        json.dumps({"prompt": "F1", "output": "set slot num_nights 3", "id": "a"})
        + "\n"
        + json.dumps({"prompt": "F2", "output": "set slot car_pickup_city 3"})
        + "\n"
    )
    answers = {"F1": "set slot num_nights 3.0", "F2": "set slot car_pickup_city 3.0"}
    with ScriptedOpenAIServer(lambda body: answers[prompt_of(body)]) as server:
        code, report = _evaluate(
            example, tmp_path / "out", [str(rows)], ["--endpoint", server.base_url, "--endpoint-model", "m"]
        )
    assert code == 0
    m = _metrics(report)
    assert (m["turns"], m["correct_turns"]) == (2, 1)  # 3 == 3.0 for the float slot; "3" != "3.0" for the text slot
    assert [turn["id"] for turn in m["worst_turns"]] == ["llm_ft_data.jsonl:2"]
    assert m["per_command"]["set slot"] == {
        "tp": 1,
        "fp": 1,
        "fn": 1,
        "support": 2,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
    }


def test_left_out_derived_turns_are_counted_in_the_report(example, validation, tmp_path, capsys):
    e2e = str(example / "e2e_tests" / "e2e" / "assertion_checks.yml")
    hotels = str(example / "e2e_tests" / "hotels")
    with ScriptedOpenAIServer(lambda body: "offtopic reply") as server:
        models = ["--endpoint", server.base_url, "--endpoint-model", "m"]
        _, derived = _evaluate(example, tmp_path / "a", [e2e], models, "--include-derived")
        capsys.readouterr()
        code, report = _evaluate(example, tmp_path / "b", [hotels, e2e], models)
    turns = _metrics(derived)["turns"]
    tests = _metrics(derived)["test_cases"]
    assert code == 0 and report["left_out"] == {
        "turns": turns,
        "test_cases": tests,
        "reason": "assertions",
        "payload_turns": 3,
        "nlu_turns": 0,
        "rasa_version_turns": 0,
    }  # hotel buttons
    line = f"left out {turns} turn(s) ({tests} test case(s) entirely) whose commands are derived"
    assert line in capsys.readouterr().out
    markdown = (tmp_path / "b" / "report.md").read_text(encoding="utf-8")
    assert "**Not scored:** Left out" in markdown and "--include-derived" in markdown
    # With --include-derived only the payload turn of assertion_checks.yml is left out, and said so.
    scored_all = (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    assert "--include-derived" not in scored_all and "**Not scored:** Left out 1 payload turn(s)" in scored_all


def test_inputs_are_checked_before_any_model_is_loaded(example, tmp_path, capsys):
    models = ["--model", str(tmp_path / "no_such_model")]
    assert _evaluate(example, tmp_path / "out", [str(tmp_path / "missing.jsonl")], models)[0] == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "file not found" in err and "model folder" not in err
    assert _evaluate(example, tmp_path / "out", [str(tmp_path / "no_tests")], models)[0] == 2
    err = capsys.readouterr().err
    assert "no_tests" in err and "model folder" not in err and len(err.strip().splitlines()) == 1


def test_template_flag_with_jsonl_and_no_datetime_against_training(example, tmp_path, capsys):
    rows = tmp_path / "val.jsonl"
    rows.write_text(json.dumps({"prompt": "P", "completion": "cancel flow"}) + "\n")
    other = tmp_path / "other.jinja2"
    other.write_text("{{ user_message }}", encoding="utf-8")
    with ScriptedOpenAIServer(lambda body: "cancel flow") as server:
        code, report = _evaluate(
            example,
            tmp_path / "out",
            [str(rows)],
            ["--endpoint", server.base_url, "--endpoint-model", "m"],
            "--prompt-template",
            str(other),
        )
    assert code == 0 and _metrics(report)["correct_turns"] == 1 and not report["models"][0]["warnings"]
    assert "--prompt-template is ignored for .jsonl inputs" in capsys.readouterr().err

    template = load_template(PROMPTS_DIR / "command_prompt_v2.jinja2")
    model = finetuned_folder(tmp_path / "models", template)
    info_file = model / "recipe_training_info.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "include_date_time": True}))
    code, _ = _evaluate(
        example,
        tmp_path / "out2",
        [str(rows)],
        ["--model", str(model)],
        "--no-datetime",
        "--max-tokens",
        "1",
        "--threads",
        "1",
    )
    assert code == 0 and "prompts will differ from training" in capsys.readouterr().err
