"""Projects Rasa Pro accepts are read with the runtime's meaning (tests/conformance/, one small assistant per
feature): NLU-filled slots next to LLM-filled ones, values the assistant rejects, clarification assertions by flow
name, test files whose cases are commented out, repeated test case names, the project's own command generator.

Each case reads with exit 0 through the real CLI, yields the rows and reasons expected, and replays with the state
the runtime would have (the prompt after a rejection shows the slot unset and the question asked again).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from recipe.annotate import NLU_REASON, annotate_from_assertions
from recipe.cli import main
from recipe.commands import Clarify, SetSlot, StartFlow, Syntax, format_command
from recipe.conversation import replay_test_case
from recipe.evaluate import cases_from_tests, left_out_summary
from recipe.project import load_project
from recipe.prompt import DatetimePolicy, choose_syntax, prompt_variables
from recipe.testcases import all_test_cases, load_tests

CORPUS = Path(__file__).parent / "conformance"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_yaml(path: Path):
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def cases_of(name: str, *tests: str):
    root = CORPUS / name
    project = load_project(root)
    return project, all_test_cases(load_tests([str(root / t) for t in tests or ("e2e_tests",)], project))


def prepare(name: str, tests: list[str], out: Path) -> dict:
    root = CORPUS / name
    code = main(
        [
            "prepare-data",
            *[str(root / t) for t in tests],
            "--project",
            str(root),
            "--offline",
            "--no-progress",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    return read_yaml(out / "result_summary.yaml")


# ---------------------------------------------------------------------------------------------- rejected values


def test_rejected_values_reset_the_slot_say_why_and_ask_again():
    project, cases = cases_of("slot_rejection")
    turns = replay_test_case(project, cases[0])
    assert [w for turn in turns for w in turn.warnings] == []  # the replay says what the test's bot turns say
    first, second = turns[0], turns[1]
    assert [m.utter for m in first.bot_messages] == ["utter_categorical_slot_rejection", "utter_ask_pizza_size"]
    assert "huge" in (first.bot_messages[0].text or "")
    assert ("pizza_size", "huge") in first.events.slots_set and first.slots_after.get("pizza_size") is None

    variables = prompt_variables(project, second.state, second.text, None)
    assert variables["current_slot"] == "pizza_size"  # the same collect asks again
    assert next(s for s in variables["flow_slots"] if s["name"] == "pizza_size")["value"] == "undefined"
    history = variables["current_conversation"].splitlines()
    assert history[:2] == ["USER: a huge pizza please", f"AI: {first.bot_messages[0].text}"]
    assert history[2].startswith("AI: Which size?") and history[3] == "USER: large then"
    # The project's own rejection text wins over the built-in one.
    float_turn = turns[4]
    assert [m.text for m in float_turn.bot_messages][0] == "A tip has to be a number, like 2 or 3.5."
    assert turns[5].state.slots.get("tip") is None and turns[6].state.slots["tip"] == 3.0


def test_rejected_values_are_labelled_as_the_user_said_them(tmp_path):
    summary = prepare("slot_rejection", ["e2e_tests"], tmp_path)
    rows = [
        r
        for r in read_jsonl(tmp_path / "3_llm_finetune_data/llm_ft_data.jsonl")
        if r["rephrased_user_utterance"] is None
    ]
    outputs = {row["original_user_utterance"]: row["output"] for row in rows}
    assert outputs["a huge pizza please"] == "start flow order_pizza\nset slot pizza_size huge"
    assert outputs["maybe"] == "set slot extra_cheese maybe"
    assert outputs["a lot"] == "set slot tip a lot"
    # Derived from an assertion test: the asserted value, rejected afterwards, is the label.
    assert outputs["an enormous pizza"] == "start flow order_pizza\nset slot pizza_size enormous"
    assert summary["recipe"]["skipped_turns"] == [] and summary["recipe"]["tracker_warnings"] == {}


# ---------------------------------------------------------------------------------------------- NLU and payload turns


def test_nlu_commands_change_the_state_and_train_nothing(tmp_path):
    project, cases = cases_of("nlu_slots", "dialogue_understanding_tests")
    turns = replay_test_case(project, cases[0])
    assert [w for turn in turns for w in turn.warnings] == []
    assert turns[1].state.flow_starts == (("transfer_money", 1),)  # after the first user message: for retrieval
    after_nlu = prompt_variables(project, turns[2].state, turns[2].text, None)
    assert next(s for s in after_nlu["flow_slots"] if s["name"] == "account_type")["value"] == "savings"
    annotation = annotate_from_assertions(project, cases[0])
    assert (annotation.turns[1].source, annotation.turns[1].reason, annotation.turns[1].trains) == (
        "nlu",
        NLU_REASON,
        False,
    )

    summary = prepare("nlu_slots", ["dialogue_understanding_tests", "e2e_tests"], tmp_path)
    rows = read_jsonl(tmp_path / "3_llm_finetune_data/llm_ft_data.jsonl")
    said = {row["original_user_utterance"] for row in rows}
    assert "from savings" not in said and "/SetSlots(account_type=checking)" not in said
    assert {"I want to send money to Mia", "fifty euros", "pay Leo", "20"} <= said
    assert all("/SetSlots" not in (row["rephrased_user_utterance"] or "") for row in rows)
    extra = summary["recipe"]
    assert extra["turns_without_rows"] == {"payload": 1, "nlu": 1}
    assert extra["nlu_turns"] == [
        {
            "test": "dialogue_understanding_tests/transfers.yml::transfer with an account from NLU",
            "turn": 2,
            "reason": NLU_REASON,
        }
    ]


def test_coverage_counts_nlu_turns_apart(tmp_path):
    root = CORPUS / "nlu_slots"
    assert (
        main(["coverage", str(root / "dialogue_understanding_tests"), "--project", str(root), "-o", str(tmp_path)]) == 0
    )
    report = json.loads((tmp_path / "coverage.json").read_text(encoding="utf-8"))
    assert [(t["turn"], t["commands"]) for t in report["nlu_turns"]] == [(2, ["set slot account_type savings"])]
    account = next(s for s in report["slots"] if s["slot"] == "account_type")
    assert (account["nlu_sets"], account["payload_sets"], account["set_commands"]) == (1, 1, 0)
    assert len(report["payload_turns"]) == 1


def test_evaluate_says_which_turns_it_leaves_out():
    root = CORPUS / "nlu_slots"
    project = load_project(root)
    left_out: list[tuple[str, str]] = []
    cases = cases_from_tests(
        project, [str(root / "dialogue_understanding_tests")], DatetimePolicy(include=False), left_out=left_out
    )
    summary = left_out_summary(cases, left_out)
    assert (summary.payload_turns, summary.nlu_turns, len(cases)) == (1, 1, 6)
    assert "left out 1 payload turn(s)" in summary.message() and "left out 1 NLU turn(s)" in summary.message()


# ---------------------------------------------------------------------------------------------- clarification


def test_clarification_assertions_name_flows_by_name_or_id():
    project, cases = cases_of("clarification_names")
    for case in cases:
        annotation = annotate_from_assertions(project, case)
        assert annotation.turns[0].commands == [Clarify(("request_money", "send_money"))], case.name
        turns = replay_test_case(project, case, annotation.commands_for)
        assert sorted(turns[0].events.clarification_options) == ["request_money", "send_money"]
    assert annotate_from_assertions(project, cases[0]).turns[1].commands == [StartFlow("send_money")]


# ---------------------------------------------------------------------------------------------- test file shapes


def test_commented_out_and_empty_files_are_skipped_with_a_warning_in_a_folder(caplog):
    with caplog.at_level(logging.WARNING, logger="recipe"):
        _, cases = cases_of("test_file_shapes")
    assert "all_commented.yml: no test cases (all commented out?); skipped" in caplog.text
    assert "empty.yml: empty file; skipped" in caplog.text
    assert len(cases) == 2


def test_a_commented_out_file_named_explicitly_is_an_error(capsys):
    root = CORPUS / "test_file_shapes"
    code = main(["coverage", str(root / "e2e_tests" / "all_commented.yml"), "--project", str(root)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].endswith(
        "all_commented.yml:2: the file has no test cases (all commented out?); expected at "
        "least one under `test_cases:`"
    )


def test_repeated_test_case_names_are_both_kept(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="recipe"):
        _, cases = cases_of("test_file_shapes", "e2e_tests/repeated.yml")
    assert [case.id for case in cases] == ["e2e_tests/repeated.yml::send money", "e2e_tests/repeated.yml::send money#2"]
    assert "is used again in this file; both are kept" in caplog.text

    summary = prepare("test_file_shapes", ["e2e_tests/repeated.yml"], tmp_path)
    assert summary["num_input_e2e_tests"] == 2 and len(list((tmp_path / "1_command_annotations").rglob("*.yaml"))) == 2
    suites = [read_yaml(p) for p in (tmp_path / "4_train_test_split/e2e_tests").rglob("*.yml")]
    written = [step["user"] for suite in suites for case in suite["test_cases"] for step in case["steps"]]
    assert sorted(written) == ["I'd like to pay Bo", "send money to Ann"]


# ---------------------------------------------------------------------------------------------- generators


def _project_with_generator(tmp_path: Path, name: str, module: str | None) -> Path:
    root = tmp_path / "assistant"
    shutil.copytree(CORPUS / "clarification_names", root)
    (root / "config.yml").write_text(f"pipeline:\n  - name: {name}\n", encoding="utf-8")
    if module is not None:
        (root / "custom").mkdir()
        (root / "custom" / "generators.py").write_text(module, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("base", "syntax"),
    [
        ("CompactLLMCommandGenerator", Syntax.V2),
        ("SingleStepLLMCommandGenerator", Syntax.V1),
        ("SearchReadyLLMCommandGenerator", Syntax.V3),
    ],
)
def test_a_custom_generator_takes_the_syntax_of_its_base_class(tmp_path, caplog, base, syntax):
    module = (
        f"from rasa.dialogue_understanding.generator import {base}\n\n\n"
        f"class Base({base}):\n    pass\n\n\nclass MyCommandGenerator(Base):\n    pass\n"
    )
    root = _project_with_generator(tmp_path, "custom.generators.MyCommandGenerator", module)
    with caplog.at_level(logging.WARNING, logger="recipe"):
        assert choose_syntax(load_project(root)) is syntax
    assert "cannot tell" not in caplog.text


def test_an_unknown_custom_generator_warns_and_names_the_flag(tmp_path, caplog):
    root = _project_with_generator(tmp_path, "custom.generators.ElsewhereCommandGenerator", None)
    project = load_project(root)
    with caplog.at_level(logging.WARNING, logger="recipe"):
        assert choose_syntax(project) is Syntax.V2
        assert choose_syntax(project, "v1") is Syntax.V1
    assert caplog.text.count("--command-syntax") == 1
    assert "config.yml:2: the command generator `custom.generators.ElsewhereCommandGenerator`" in caplog.text
    label = format_command(SetSlot("recipient", "Ann"), choose_syntax(project, "v1"))
    assert label == "SetSlot(recipient, Ann)"


# ---------------------------------------------------------------------------------------------- evidence


def test_without_an_action_server_the_tests_bot_turns_decide_what_actions_did():
    project, cases = cases_of("bot_turn_evidence")
    transfer = replay_test_case(project, cases[0])
    # `action_check_funds` has no stub: only the `funds_ok` branch says `utter_transfer_ok`, as the test does.
    assert [m.utter for m in transfer[0].events.bot_messages][:1] == ["utter_transfer_ok"]
    assert "branch `slots.funds_ok`" in transfer[0].inferences[0]
    # A bot text that fills a response template gives the slot values behind it.
    assert transfer[1].slots_after == {"account_type": "savings", "balance": "1,204.50 EUR"}
    assert all(turn.disagreements == [] for turn in transfer)

    card = cases[1]
    annotation = annotate_from_assertions(project, card)  # the slot check explains the branch, and the flow started
    assert annotation.turns[0].commands == [StartFlow("card_status")]
    turns = replay_test_case(project, card, annotation.commands_for)
    assert turns[0].inferences == ["`card_status` = 'blocked' after `action_lookup_card`, from the test's slot checks"]
    assert [m.utter for m in turns[0].events.bot_messages][:1] == ["utter_card_blocked"]


def test_state_disagreements_are_counted_and_their_rows_left_out(tmp_path):
    summary = prepare("bot_turn_evidence", ["e2e_tests"], tmp_path / "agree")
    assert (summary["recipe"]["state_disagreements"], summary["recipe"]["state_inferences"]) == (0, 4)

    # The same test, with a bot turn no branch can produce: the state after turn 1 is contradicted, so turn 2's
    # rows are left out (and kept with --keep-disagreeing).
    root = tmp_path / "assistant"
    shutil.copytree(CORPUS / "bot_turn_evidence", root)
    tests = root / "e2e_tests" / "evidence.yml"
    tests.write_text(
        tests.read_text(encoding="utf-8").replace("utter: utter_transfer_ok", "utter: utter_card_fine"),
        encoding="utf-8",
    )
    args = [str(root / "e2e_tests"), "--project", str(root), "--offline", "--no-progress", "--num-rephrases", "0"]
    assert main(["prepare-data", *args, "-o", str(tmp_path / "left")]) == 0
    assert main(["prepare-data", *args, "--keep-disagreeing", "-o", str(tmp_path / "kept")]) == 0
    left, kept = (read_yaml(tmp_path / name / "result_summary.yaml") for name in ("left", "kept"))
    assert left["recipe"]["state_disagreements"] == 1 and left["recipe"]["rows_left_out_disagreeing"] == 1
    what = left["recipe"]["per_test_case"]["e2e_tests/evidence.yml::transfer that goes through"]["state_disagreements"]
    assert "the test expects `utter_card_fine` after turn 1" in what[1][0]
    assert kept["num_ft_data_points"] == left["num_ft_data_points"] + 1


# ---------------------------------------------------------------------------------------------- every case


def _tests_of(root: Path) -> list[str]:
    return [str(folder) for folder in (root / "e2e_tests", root / "dialogue_understanding_tests") if folder.is_dir()]


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir() if p.is_dir()))
def test_every_case_reads_with_exit_0_and_replays_without_disagreement(name, tmp_path, capsys):
    root = CORPUS / name
    assert main(["coverage", *_tests_of(root), "--project", str(root), "-o", str(tmp_path / "coverage")]) == 0
    report = json.loads((tmp_path / "coverage" / "coverage.json").read_text(encoding="utf-8"))
    assert report["state_disagreements"] == {}
    assert (
        main(
            [
                "prepare-data",
                *_tests_of(root),
                "--project",
                str(root),
                "--offline",
                "--no-progress",
                "--num-rephrases",
                "1",
                "-o",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    summary = read_yaml(tmp_path / "out" / "result_summary.yaml")
    assert summary["recipe"]["state_disagreements"] == 0 and summary["num_ft_data_points"] > 0
    assert "Traceback" not in capsys.readouterr().err
