"""What Rasa Pro 3.10 to 3.21 accept, on small projects written for it (tests/data/rasa_versions/):

* the command set follows `--rasa-version` (3.16 removed `hand over`; 3.14 added agent commands) in parser,
  templates, validation, constrained decoding, prepare-data and evaluate;
* the template variables the runtime always passes (`current_slot_type`, `current_slot_allowed_values`, and with
  sub-agents `active_agent`, `completed_agents`, `agent_info`, the agent's name in the transcript);
* sub-agents (`sub_agents/<agent>/config.yml`) and MCP tools (`call:` with `mcp_server:`) read, replayed, trained;
* a project's own commands declared in `custom_commands.yml`;
* `--prompt-template rasa:<file>` and config.yml's model picking a template of the user's installed Rasa (a fake
  `rasa` package written here, holding a template of our own words);
* transcript buttons since 3.16; conversational rows as a notebook that reads `examples["messages"]` loads them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from recipe.annotate import annotate_from_assertions
from recipe.backends import OpenAIBackend
from recipe.cli import main
from recipe.command_validation import validate_commands
from recipe.commands import (
    NEWEST_RASA_VERSION,
    ContinueAgent,
    CustomCommand,
    HumanHandoff,
    RasaVersion,
    RestartAgent,
    SetSlot,
    StartFlow,
    Syntax,
    format_command,
    parse_command,
    parse_model_output,
    parse_rasa_version,
)
from recipe.conversation import replay_test_case
from recipe.errors import ConfigError, InputErrors
from recipe.grammar import build_grammar
from recipe.project import load_project
from recipe.prompt import (
    COMMAND_PROMPT_VARIABLES,
    PromptRenderer,
    PromptTemplate,
    choose_template,
    prompt_variables,
    transcript_lines,
)
from recipe.runtime import CommandGenerator
from recipe.testcases import all_test_cases, load_tests
from recipe.testing.openai_server import ScriptedOpenAIServer
from recipe.tracker import TranscriptLine
from recipe.types import Button

DATA = Path(__file__).resolve().parent / "data" / "rasa_versions"
V315, V321 = RasaVersion(3, 15), RasaVersion(3, 21)


def _project(name: str, version: RasaVersion = V321):
    project = load_project(DATA / name)
    project.rasa_version = version
    return project


def _replay(project, name: str, case_name: str):
    case = next(c for c in all_test_cases(load_tests([str(DATA / name / "e2e_tests")], project)) if c.name == case_name)
    annotation = annotate_from_assertions(project, case)
    return case, annotation, replay_test_case(project, case, annotation.commands_for)


def _rows(out: Path) -> list[dict]:
    splits = out / "4_train_test_split" / "ft_splits"
    return [
        json.loads(line)
        for name in ("train.jsonl", "val.jsonl")
        for line in (splits / name).read_text(encoding="utf-8").splitlines()
    ]


def _prepare(name: str, out: Path, *extra: str) -> int:
    return main(
        [
            "prepare-data",
            str(DATA / name / "e2e_tests"),
            "--project",
            str(DATA / name),
            "--offline",
            "--num-rephrases",
            "0",
            "--no-progress",
            "-o",
            str(out),
            "--train-frac",
            "1",
            *extra,
        ]
    )


# ---------------------------------------------------------------------------------------------- versions


def test_rasa_versions_are_read_and_bounded():
    assert parse_rasa_version("3.21.0") == V321 == NEWEST_RASA_VERSION
    assert parse_rasa_version("3.15") == V315 and parse_rasa_version("3.12.4rc1") == RasaVersion(3, 12)
    for bad in ("3.9", "3.22", "four", "3"):
        with pytest.raises(ValueError):
            parse_rasa_version(bad)


def test_a_bad_rasa_version_is_one_line_and_exit_2(capsys):
    code = main(
        ["coverage", str(DATA / "handoff" / "e2e_tests"), "--project", str(DATA / "handoff"), "--rasa-version", "2.8"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--rasa-version 2.8" in err[0] and "3.10 to 3.21" in err[0]


# ---------------------------------------------------------------------------------------------- handoff


@pytest.mark.parametrize("syntax", [Syntax.V1, Syntax.V2, Syntax.V3])
def test_handoff_parses_up_to_3_15_and_is_a_dropped_line_from_3_16(syntax):
    line = format_command(HumanHandoff(), syntax)
    assert parse_model_output(f"{line}\n", syntax, V315).commands == (HumanHandoff(),)
    dropped = parse_model_output(f"{line}\n{format_command(StartFlow('rent_car'), syntax)}", syntax, V321)
    assert dropped.commands == (StartFlow("rent_car"),) and dropped.unparsed_lines == (line,)
    assert parse_command(line) == HumanHandoff()  # tests that use it are still read


def test_handoff_in_templates_grammar_and_validation_follows_the_version():
    for version, offered in ((V315, True), (V321, False)):
        project = _project("handoff", version)
        for syntax in (Syntax.V1, Syntax.V2):
            template = choose_template(project, syntax)
            assert (format_command(HumanHandoff(), syntax) in template.text) is offered
            matcher = build_grammar(project, syntax).matcher()
            assert matcher.fullmatch(format_command(HumanHandoff(), syntax)) is offered
            assert matcher.fullmatch(format_command(StartFlow("rent_car"), syntax))
        kept, dropped = validate_commands([HumanHandoff()], project)
        assert (kept == [HumanHandoff()]) is offered
        if not offered:
            assert "removed in 3.16" in dropped[0].reason


def test_handoff_turns_are_left_out_from_3_16_with_the_reason_and_trained_up_to_3_15(tmp_path):
    assert _prepare("handoff", tmp_path / "new") == 0
    completions = [row["completion"] for row in _rows(tmp_path / "new")]
    assert "hand over" not in "\n".join(completions)
    assert "set slot size large" not in completions  # the turn after it: its state would be a guess
    summary = yaml.safe_load((tmp_path / "new" / "result_summary.yaml").read_text(encoding="utf-8"))
    skipped = {(s["turn"], s["reason"].split(" (")[0]) for s in summary["recipe"]["skipped_turns"]}
    assert skipped == {
        (2, "`human handoff` is not a command in Rasa Pro 3.21"),
        (3, "comes after turn 2, whose commands are unknown"),
    }
    info = json.loads((tmp_path / "new" / "4_train_test_split/ft_splits/dataset_info.json").read_text())
    assert info["rasa_version"] == "3.21"
    assert _prepare("handoff", tmp_path / "old", "--rasa-version", "3.15") == 0
    old = [row["completion"] for row in _rows(tmp_path / "old")]
    assert "hand over" in old and "set slot size large" in old


def test_evaluate_scores_by_the_version(tmp_path, capsys):
    tests = str(DATA / "handoff" / "e2e_tests")

    def evaluate(version: str, out: Path) -> dict:
        with ScriptedOpenAIServer(lambda body: "hand over") as server:
            code = main(
                [
                    "evaluate",
                    tests,
                    "--project",
                    str(DATA / "handoff"),
                    "--endpoint",
                    server.base_url,
                    "--endpoint-model",
                    "m",
                    "-o",
                    str(out),
                    "--no-progress",
                    "--rasa-version",
                    version,
                ]
            )
        assert code == 0
        return json.loads((out / "report.json").read_text(encoding="utf-8"))

    new = evaluate("3.21", tmp_path / "new")
    assert new["left_out"]["rasa_version_turns"] == 2
    metrics = new["models"][0]["metrics"]
    assert metrics["turns"] == 4 and metrics["correct_turns"] == 0  # `hand over` answers are dropped lines
    assert "human handoff" not in metrics["per_command"]
    old = evaluate("3.15", tmp_path / "old")
    assert old["left_out"]["rasa_version_turns"] == 0
    assert old["models"][0]["metrics"]["turns"] == 6 and old["models"][0]["metrics"]["correct_turns"] == 1
    assert old["models"][0]["metrics"]["per_command"]["human handoff"]["tp"] == 1


# ---------------------------------------------------------------------------------------------- variables, transcript


def test_current_slot_type_and_allowed_values_are_passed():
    project = _project("handoff")
    _, _, turns = _replay(project, "handoff", "plain booking")
    asking_size = prompt_variables(project, turns[2].state, "small", None)
    assert (asking_size["current_slot"], asking_size["current_slot_type"]) == ("size", "categorical")
    assert asking_size["current_slot_allowed_values"] == "['small', 'large']"
    asking_city = prompt_variables(project, turns[1].state, "Porto", None)
    assert (asking_city["current_slot_type"], asking_city["current_slot_allowed_values"]) == ("text", None)
    outside = prompt_variables(project, turns[0].state, "rent a car", None)
    assert outside["current_slot_type"] is None and "active_agent" not in outside  # no sub-agents: not passed
    assert {
        "current_slot_type",
        "current_slot_allowed_values",
        "active_agent",
        "completed_agents",
    } <= COMMAND_PROMPT_VARIABLES
    template = "{{ current_slot_type }}|{{ current_slot_allowed_values }}"
    assert PromptRenderer(PromptTemplate(template, "t"), COMMAND_PROMPT_VARIABLES).render(asking_size) == (
        "categorical|['small', 'large']"
    )


def test_buttons_since_3_16_skip_empty_titles_and_newlines():
    line = TranscriptLine(
        "AI", "Small or large?", (Button("Small\ncar", "/a"), Button("", "/b"), Button("Large", "/c"))
    )
    assert transcript_lines([line], version=V321) == ['AI: Small or large? button 1: "Small car", button 3: "Large"']
    assert transcript_lines([line], version=V315) == [
        'AI: Small or large? button 1: "Small\ncar", button 2: "", button 3: "Large"'
    ]
    only_empty = TranscriptLine("AI", None, (Button("", "/b"),))
    assert transcript_lines([only_empty], version=V321) == []


# ---------------------------------------------------------------------------------------------- sub-agents and MCP


def test_sub_agents_and_mcp_servers_are_read():
    project = _project("agents")
    assert list(project.agents) == ["car_research"] and project.agents["car_research"].protocol == "RASA"
    assert project.mcp_servers == {"dealer_inventory": "http://localhost:8090"}
    call = next(s for s in project.flows["buy_car"].steps.values() if s.mcp_server)
    assert (call.call, call.mapping["output"][0]["slot"]) == ("check_stock", "stock")


def test_a_call_to_nothing_known_names_what_it_may_be(tmp_path):
    root = tmp_path / "p"
    shutil.copytree(DATA / "agents", root)
    shutil.rmtree(root / "sub_agents")
    (root / "endpoints.yml").unlink()
    with pytest.raises(InputErrors) as raised:
        load_project(root)
    messages = [error.format() for error in raised.value.errors]
    assert any("calls unknown flow `car_research`" in m and "sub-agent in sub_agents/" in m for m in messages)
    assert any("MCP server `dealer_inventory`" in m for m in messages)


def test_agent_turns_replay_with_the_agent_variables_and_speaker():
    project = _project("agents")
    _, annotation, turns = _replay(project, "agents", "research then buy")
    assert all(turn.commands is not None for turn in annotation.turns)
    second = prompt_variables(project, turns[1].state, turns[1].text, None)
    assert second["active_agent"] == {"name": "car_research", "description": project.agents["car_research"].description}
    assert second["completed_agents"] == []
    assert second["available_flows"][0]["agent_info"] == [second["active_agent"]]
    assert "car_research: Do you prefer a city car or an SUV?" in second["current_conversation"].splitlines()
    last = prompt_variables(project, turns[3].state, turns[3].text, None)
    assert last["active_agent"] is None and last["completed_agents"] == [second["active_agent"]]
    assert turns[3].state.slots["car_model"] == "Fiat 500"  # read from the test's slot check after the agent
    assert last["current_slot"] == "confirm_purchase"
    lines = last["current_conversation"].splitlines()
    assert "car_research: I recommend the Fiat 500." in lines and "AI: Shall I order it?" in lines
    # the agent commands in the prompt, the grammar and validation
    prompt = CommandGenerator.for_model(project, OpenAIBackend("http://127.0.0.1:1/v1", "m")).render(
        turns[1].state, turns[1].text
    )
    assert "continue agent: the user answers the active agent car_research" in prompt
    assert "restart agent" not in prompt
    matcher = build_grammar(project, Syntax.V2).matcher()
    assert matcher.fullmatch("continue agent") and matcher.fullmatch("restart agent car_research")
    assert not matcher.fullmatch("restart agent other")
    assert validate_commands([ContinueAgent()], project, turns[1].state)[0] == [ContinueAgent()]
    assert validate_commands([ContinueAgent()], project, turns[3].state)[0] == []
    assert validate_commands([RestartAgent("car_research")], project, turns[1].state)[0] == []
    assert validate_commands([RestartAgent("car_research")], project, turns[3].state)[0] == [
        RestartAgent("car_research")
    ]


def test_agent_commands_need_3_14():
    project = _project("agents", RasaVersion(3, 13))
    matcher = build_grammar(project, Syntax.V2).matcher()
    assert not matcher.fullmatch("continue agent")
    assert parse_model_output("continue agent", Syntax.V2, project.rasa_version).unparsed_lines == ("continue agent",)


def test_agent_turns_train_continue_and_restart_rows(tmp_path):
    assert _prepare("agents", tmp_path / "out") == 0
    completions = [row["completion"] for row in _rows(tmp_path / "out")]
    assert completions.count("continue agent") == 2 and "restart agent car_research" in completions


# ---------------------------------------------------------------------------------------------- custom commands


def test_custom_commands_in_parser_template_grammar_validation():
    project = _project("custom_commands")
    spec = project.custom_commands[0]
    command = parse_command("check balance show_balance savings", custom=project.custom_commands)
    assert isinstance(command, CustomCommand) and command.as_dict() == {
        "command": "check balance",
        "flow_id": "show_balance",
        "account": "savings",
    }
    assert format_command(command, Syntax.V1) == "CheckBalance(show_balance, savings)"
    assert parse_command("CheckBalance(show_balance, savings)", [Syntax.V1], project.custom_commands) == command
    assert "check balance FLOW_ID ACCOUNT: the user asks for the balance" in choose_template(project, Syntax.V2).text
    assert "CheckBalance(flow_id, account): the user asks" in choose_template(project, Syntax.V1).text
    matcher = build_grammar(project, Syntax.V2).matcher()
    assert matcher.fullmatch("check balance show_balance savings") and not matcher.fullmatch("check balance nope x")
    wrong = parse_command("check balance nope savings", custom=project.custom_commands)
    assert "unknown flow `nope`" in validate_commands([wrong], project)[1][0].reason
    assert spec.name == "check balance"
    parsed = parse_model_output(
        "check balance transfer checking\nset slot account savings", Syntax.V2, custom=project.custom_commands
    )
    assert parsed.fully_parsed and parsed.commands[1] == SetSlot("account", "savings")


def test_custom_commands_train_and_score(tmp_path):
    assert _prepare("custom_commands", tmp_path / "out") == 0
    assert "check balance show_balance savings" in [row["completion"] for row in _rows(tmp_path / "out")]
    answers = iter(["check balance show_balance savings", "start flow show_balance", "set slot account checking"])
    with ScriptedOpenAIServer(lambda body: next(answers)) as server:
        code = main(
            [
                "evaluate",
                str(DATA / "custom_commands" / "e2e_tests"),
                "--project",
                str(DATA / "custom_commands"),
                "--endpoint",
                server.base_url,
                "--endpoint-model",
                "m",
                "-o",
                str(tmp_path / "eval"),
                "--no-progress",
            ]
        )
    metrics = json.loads((tmp_path / "eval" / "report.json").read_text())["models"][0]["metrics"]
    assert code == 0 and metrics["correct_turns"] == 3 and metrics["per_command"]["check balance"]["tp"] == 1


def test_a_bad_custom_command_declaration_is_one_line(tmp_path, capsys):
    root = tmp_path / "p"
    shutil.copytree(DATA / "custom_commands", root)
    (root / "custom_commands.yml").write_text(
        "commands:\n  - name: x\n    arguments: {a: number}\n    syntax: {v1: 'X({a})', v2: 'x {a}'}\n",
        encoding="utf-8",
    )
    code = main(["coverage", str(root / "e2e_tests"), "--project", str(root), "-o", str(tmp_path / "cov")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].endswith(
        "custom_commands.yml:3: argument `a` has type `number`; expected one of flow, slot, agent, value"
    )


# ---------------------------------------------------------------------------------------------- the user's Rasa


OWN_WORDS = "Our stand-in for a Rasa template.\n{{ current_conversation }}\nflow: {{ current_flow }}\nAnswer:"


def _fake_rasa(root: Path, names: list[str]) -> Path:
    """A package called `rasa` holding templates of our own words where Rasa Pro keeps its templates."""
    folder = root / "site" / "rasa" / "dialogue_understanding" / "generator" / "prompt_templates"
    folder.mkdir(parents=True)
    (root / "site" / "rasa" / "__init__.py").write_text("", encoding="utf-8")
    for name in names:
        (folder / name).write_text(OWN_WORDS + name, encoding="utf-8")
    return root / "site"


@pytest.fixture
def fake_rasa(tmp_path, monkeypatch):
    site = _fake_rasa(
        tmp_path,
        [
            "command_prompt_v2_gpt_5_1_2025_11_13_template.jinja2",
            "command_prompt_v2_claude_sonnet_4_5_20250929_template.jinja2",
        ],
    )
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("rasa", None)
    yield site
    sys.modules.pop("rasa", None)


def test_rasa_template_by_name_is_read_from_the_installed_rasa(fake_rasa, capsys):
    project = _project("handoff")
    template = choose_template(project, Syntax.V2, "rasa:command_prompt_v2_gpt_5_1_2025_11_13_template.jinja2")
    assert template.text.startswith(OWN_WORDS) and str(fake_rasa) in template.path
    with pytest.raises(ConfigError, match="has no such template"):
        choose_template(project, Syntax.V2, "rasa:nope.jinja2")
    test = f"{DATA / 'handoff' / 'e2e_tests' / 'du.yml'}::plain booking"
    assert (
        main(
            [
                "render-prompt",
                test,
                "--step",
                "2",
                "--project",
                str(DATA / "handoff"),
                "--prompt-template",
                "rasa:command_prompt_v2_gpt_5_1_2025_11_13_template.jinja2",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Our stand-in for a Rasa template.\nUSER: rent a car\n")


def test_config_yml_picks_the_template_rasa_picks_for_the_model(fake_rasa, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(DATA / "handoff", root)
    for model, expected in (("claude-sonnet-4-6", "claude_sonnet_4_5_20250929"), ("my-finetune", "gpt_5_1_2025_11_13")):
        provider = "anthropic" if model.startswith("claude") else "self-hosted"
        (root / "config.yml").write_text(
            f"pipeline:\n  - name: CompactLLMCommandGenerator\n    llm:\n      provider: {provider}\n"
            f"      model: {model}\n",
            encoding="utf-8",
        )
        template = choose_template(load_project(root), Syntax.V2)
        assert template.path.endswith(f"command_prompt_v2_{expected}_template.jinja2")


def test_without_rasa_a_rasa_template_is_a_one_line_error_naming_the_file(capsys, monkeypatch):
    monkeypatch.setattr("recipe.prompt.installed_rasa_folder", lambda: None)
    test = f"{DATA / 'handoff' / 'e2e_tests' / 'du.yml'}::plain booking"
    code = main(
        [
            "render-prompt",
            test,
            "--step",
            "1",
            "--project",
            str(DATA / "handoff"),
            "--prompt-template",
            "rasa:command_prompt_v2_gpt_5_1_2025_11_13_template.jinja2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "Rasa Pro is not installed" in err[0]
    assert "--prompt-template path/to/command_prompt_v2_gpt_5_1_2025_11_13_template.jinja2" in err[0]


# ---------------------------------------------------------------------------------------------- notebook format


def test_conversational_rows_load_as_a_notebook_reading_messages_loads_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    assert _prepare("handoff", tmp_path / "out", "--output-format", "conversational") == 0
    files = {"train": str(tmp_path / "out" / "4_train_test_split/ft_splits/train.jsonl")}
    dataset = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "hf"))["train"]

    def to_text(examples):  # what a notebook's batched map over `examples["messages"]` does
        return {
            "text": [
                "\n".join(f"{m['role']}: {m['content']}" for m in conversation) for conversation in examples["messages"]
            ]
        }

    mapped = dataset.map(to_text, batched=True)
    assert len(mapped) == 4 and all(t.startswith("user: ") and "\nassistant: " in t for t in mapped["text"])
    instruction = tmp_path / "out2"
    assert _prepare("handoff", instruction) == 0
    plain = datasets.load_dataset(
        "json",
        data_files={"train": str(instruction / "4_train_test_split/ft_splits/train.jsonl")},
        cache_dir=str(tmp_path / "hf2"),
    )["train"]
    with pytest.raises(KeyError):
        plain.map(to_text, batched=True)  # the default (Rasa's default too) has prompt/completion, no messages


def test_a_users_template_offering_handoff_is_warned_about_from_3_16(tmp_path, caplog):
    template = tmp_path / "mine.jinja2"
    template.write_text("{{ current_conversation }}\nhand over: a human\nAnswer:", encoding="utf-8")
    for version, warned in ((V321, True), (V315, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="recipe"):
            choose_template(_project("handoff", version), Syntax.V2, template)
        assert any("no longer parses" in r.getMessage() for r in caplog.records) is warned
