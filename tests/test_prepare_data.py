"""`recipe prepare-data`: offline on the bundled example, and the LLM path against a real scripted server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prepare_llm import CHANGED_VALUE, ScriptedAssistantLLM, paraphrases_of, rephrase_listing, write_llm_config
from ruamel.yaml import YAML

from recipe.cli import main
from recipe.commands import CORE_COMMAND_KINDS, Syntax, parse_command
from recipe.llm import LLMConfig
from recipe.prepare import PrepareConfig, prepare_data
from recipe.prompt import PROMPTS_DIR, DatetimePolicy, choose_template, load_template
from recipe.testing.openai_server import Reply, ScriptedOpenAIServer

RASA_SUMMARY_KEYS = [
    "num_input_e2e_tests",
    "num_annotated_conversations",
    "num_user_messages_across_conversations",
    "num_user_messages_to_rephrase_across_conversations",
    "num_passing_rephrased_user_messages",
    "num_failing_rephrased_user_messages",
    "num_ft_data_points",
    "num_train_data_points",
    "num_val_data_points",
]
SPECS = ["e2e_tests/hotels/hotel_du.yml", "e2e_tests/e2e/classic_conversations.yml"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_yaml(path: Path):
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def tree(folder: Path) -> dict[str, str]:
    """Every output file's text, the LLM cache left out."""
    return {
        str(p.relative_to(folder)): p.read_text(encoding="utf-8")
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "cache" not in p.relative_to(folder).parts
    }


# ---------------------------------------------------------------------------------------------- offline


def test_offline_run_writes_the_layout_users_expect(prepared_example: Path):
    out = prepared_example
    for path in (
        "3_llm_finetune_data/llm_ft_data.jsonl",
        "4_train_test_split/ft_splits/train.jsonl",
        "4_train_test_split/ft_splits/val.jsonl",
        "4_train_test_split/ft_splits/dataset_info.json",
        "params.yaml",
        "result_summary.yaml",
    ):
        assert (out / path).is_file(), path
    assert list((out / "1_command_annotations").rglob("*.yaml"))
    assert list((out / "4_train_test_split/e2e_tests/train").rglob("*.yml"))
    assert list((out / "4_train_test_split/e2e_tests/validation").rglob("*.yml"))
    summary = read_yaml(out / "result_summary.yaml")
    assert list(summary)[: len(RASA_SUMMARY_KEYS)] == RASA_SUMMARY_KEYS
    train = read_jsonl(out / "4_train_test_split/ft_splits/train.jsonl")
    val = read_jsonl(out / "4_train_test_split/ft_splits/val.jsonl")
    assert summary["num_train_data_points"] == len(train) and summary["num_val_data_points"] == len(val)
    assert all(set(row) == {"prompt", "completion"} for row in train + val)
    assert not ({row["prompt"] for row in train} & {row["prompt"] for row in val}), "a prompt on both sides"


def test_offline_rows_are_valid_commands_covering_every_type_in_train(prepared_example: Path, example_project):
    train = read_jsonl(prepared_example / "4_train_test_split/ft_splits/train.jsonl")
    kinds = set()
    for row in train:
        assert row["completion"] and not row["completion"].endswith("\n")
        for line in row["completion"].split("\n"):
            kinds.add(parse_command(line, [Syntax.V2]).kind)  # our default syntax, one command per line
    # every kind Rasa Pro 3.21 parses (the default target: no `hand over`, whose turns are left out)
    assert set(CORE_COMMAND_KINDS) - {"cannot handle", "human handoff"} <= kinds
    assert "human handoff" not in kinds
    info = json.loads((prepared_example / "4_train_test_split/ft_splits/dataset_info.json").read_text())
    template = choose_template(example_project, Syntax.V2)
    assert info["prompt_template_sha256"] == template.sha256 and info["command_syntax"] == "v2"


def test_offline_split_keeps_test_cases_and_paraphrases_on_one_side(prepared_example: Path):
    rows = read_jsonl(prepared_example / "3_llm_finetune_data/llm_ft_data.jsonl")
    summary = read_yaml(prepared_example / "result_summary.yaml")
    sides = {test: info["split"] for test, info in summary["recipe"]["per_test_case"].items()}
    train_prompts = {r["prompt"] for r in read_jsonl(prepared_example / "4_train_test_split/ft_splits/train.jsonl")}
    for row in rows:
        if sides[row["original_test_name"]] == "train":
            assert row["prompt"] in train_prompts
    assert any(row["rephrased_user_utterance"] for row in rows)
    assert len({(r["prompt"], r["output"]) for r in rows}) == len(rows), "rows are deduplicated"
    # The split test suites hold exactly the split's test cases, with the shared conftest beside them.
    validation_root = prepared_example / "4_train_test_split/e2e_tests/validation"
    names = [
        case["test_case"]
        for f in validation_root.rglob("*.yml")
        if f.name != "conftest.yml"
        for case in read_yaml(f)["test_cases"]
    ]
    assert sorted(names) == sorted(t.split("::", 1)[1] for t, side in sides.items() if side == "validation")
    assert (validation_root / "conftest.yml").is_file()


def test_offline_run_is_deterministic_and_clears_stale_outputs(tmp_path: Path, prepared_example: Path):
    out = tmp_path / "out"
    stale = out / "3_llm_finetune_data" / "stale.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text("old\n")
    assert main(["prepare-data", "--offline", "--no-progress", "-o", str(out)]) == 0
    assert not stale.exists()
    first, again = tree(out), tree(prepared_example)
    assert first.pop("params.yaml") != again.pop("params.yaml")  # it names the output folder, nothing else differs
    assert first == again


def test_conversational_format_and_v1_syntax(tmp_path: Path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare-data",
                "e2e_tests/hotels",
                "--offline",
                "--no-progress",
                "-o",
                str(out),
                "--output-format",
                "conversational",
                "--command-syntax",
                "v1",
                "--num-rephrases",
                "2",
            ]
        )
        == 0
    )
    rows = read_jsonl(out / "4_train_test_split/ft_splits/train.jsonl")
    assert rows and all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in rows)
    assert all(parse_command(line, [Syntax.V1]) for row in rows for line in row["messages"][1]["content"].split("\n"))
    assert "Your action list:" in rows[0]["messages"][0]["content"]  # our v1 template


def test_argument_errors_stop_before_any_work(tmp_path: Path, capsys):
    assert main(["prepare-data", "--offline", "--train-frac", "1.5", "-o", str(tmp_path / "o")]) == 2
    assert "--train-frac 1.5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    config = tmp_path / "rephrase.yml"
    config.write_text("llm:\n  provider: openai\n  model: gpt-4o-mini\n")
    assert main(["prepare-data", "--rephrase-config", str(config), "-o", str(tmp_path / "o")]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- LLM path


def llm_config(project, tmp_path: Path, server: ScriptedOpenAIServer, **overrides) -> PrepareConfig:
    llm = LLMConfig(provider="self-hosted", model="scripted-model", api_base=server.base_url, timeout=1.0)
    settings = dict(
        tests=SPECS,
        out=tmp_path / "out",
        syntax=Syntax.V2,
        template=choose_template(project, Syntax.V2),
        datetime_policy=DatetimePolicy(),
        num_rephrases=3,
        rephrase_llm=llm,
        rephrase_template=load_template(PROMPTS_DIR / "rephrase.jinja2"),
        teacher_llm=llm,
        oracle_llm=llm,
        max_concurrency=4,
        show_progress=False,
        backoff_base_s=0.05,
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


def test_llm_path_rephrases_validates_with_values_and_annotates_with_the_teacher(tmp_path, example_project):
    responder = ScriptedAssistantLLM(example_project, SPECS)
    with ScriptedOpenAIServer(responder) as server:
        result = prepare_data(example_project, llm_config(example_project, tmp_path, server))
        hits = server.hits()
        # A second run is served entirely from the cache.
        prepare_data(example_project, llm_config(example_project, tmp_path, server))
        assert server.hits() == hits > 0
    summary = result.summary
    assert summary["recipe"]["errors"] == []
    assert responder.kinds["rephrase"] == summary["num_input_e2e_tests"]  # one call per conversation
    rows = read_jsonl(tmp_path / "out/3_llm_finetune_data/llm_ft_data.jsonl")
    rephrased = [row for row in rows if row["rephrased_user_utterance"]]
    assert rephrased and not any(CHANGED_VALUE in row["output"] for row in rows)
    # A value-changing paraphrase only survives where the turn sets no value at all.
    changed = [row for row in rephrased if row["rephrased_user_utterance"].startswith("Actually ")]
    assert all("set slot" not in row["output"] for row in changed)
    # Every value-changing paraphrase of a turn that sets a value fails strict validation, with the reason.
    records = list((tmp_path / "out/2_rephrasings").rglob("*.yaml"))
    failing = [
        (text, reason)
        for record in records
        for step in read_yaml(record)["conversations"][0]["steps"]
        for text, reason in zip(step.get("failing_rephrasings", []), step.get("failing_reasons", []))
    ]
    assert failing and all(text.startswith("Actually ") and CHANGED_VALUE in reason for text, reason in failing)
    # Classic tests carry no commands: the teacher annotated them, and its answers agree with the assertions.
    annotations = [read_yaml(r)["conversations"][0] for r in (tmp_path / "out/1_command_annotations").rglob("*.yaml")]
    classic = [c for c in annotations if "classic_conversations" in c["original_test_case"]]
    sources = {step.get("commands_source") for c in classic for step in c["steps"] if "user" in step}
    assert "llm" in sources
    assert summary["recipe"]["llm_usage"]["rephraser"]["api_calls"] >= summary["num_input_e2e_tests"]


def test_llm_faults_are_retried_or_recorded_and_never_drop_other_work(tmp_path, example_project):
    def faults(kind: str, prompt: str, hit: int) -> Reply | None:
        if kind == "rephrase" and "a hotel in Oslo" in prompt:
            return Reply.error(500)  # this conversation's rephraser always fails
        if kind == "rephrase" and hit == 1:
            return Reply.error(429, retry_after_ms=100)
        if kind == "rephrase" and hit == 2:
            return Reply.malformed()
        if kind == "rephrase" and hit == 3:
            return Reply.delay(3.0, then="{}")  # past the 1 s timeout
        if kind == "commands" and hit in (2, 5):
            return Reply.error(503)
        return None

    responder = ScriptedAssistantLLM(example_project, SPECS, faults=faults)
    with ScriptedOpenAIServer(responder) as server:
        result = prepare_data(example_project, llm_config(example_project, tmp_path, server, max_concurrency=2))
    errors = result.summary["recipe"]["errors"]
    assert len(errors) == 1 and "classic hotel booking in Oslo" in errors[0] and "rephrase" in errors[0]
    per_test = result.summary["recipe"]["per_test_case"]
    oslo = next(v for k, v in per_test.items() if k.endswith("classic hotel booking in Oslo"))
    assert oslo["rows"] > 0 and oslo["rephrasings_passing"] == 0  # its original rows are kept
    others = [v for k, v in per_test.items() if not k.endswith("classic hotel booking in Oslo")]
    assert all(v["rephrasings_passing"] > 0 for v in others if v["annotated_turns"])


def test_unparseable_rephrase_answers_are_read_as_numbered_text_and_topped_up(tmp_path, example_project):
    def faults(kind: str, prompt: str, hit: int) -> Reply | None:
        if kind != "rephrase":
            return None
        if " messages 3 times" in prompt:  # the first call of each conversation (the follow-up asks for 2)
            # Numbered text instead of JSON, one paraphrase per message: the follow-up call asks for the rest.
            blocks = [f"USER: {text}\n1. {paraphrases_of(text)[0]}" for _, text in rephrase_listing(prompt)]
            return Reply.text("\n\n".join(blocks))
        return None

    responder = ScriptedAssistantLLM(example_project, SPECS[:1], faults=faults)
    with ScriptedOpenAIServer(responder) as server:
        result = prepare_data(example_project, llm_config(example_project, tmp_path, server, tests=SPECS[:1]))
    summary = result.summary
    assert summary["recipe"]["errors"] == []
    cases = summary["num_input_e2e_tests"]
    assert responder.kinds["rephrase"] == 2 * cases  # one follow-up per conversation
    assert (
        summary["recipe"]["rephrasings"]["received"]
        == 3 * summary["num_user_messages_to_rephrase_across_conversations"]
    )


def test_a_killed_run_resumes_without_paying_twice_and_writes_the_same_files(tmp_path, example_project):
    specs = SPECS[:1]
    responder = ScriptedAssistantLLM(example_project, specs)
    with ScriptedOpenAIServer(responder) as server:
        prepare_data(
            example_project,
            llm_config(
                example_project, tmp_path / "a", server, tests=specs, out=tmp_path / "a" / "out", max_concurrency=1
            ),
        )
        uninterrupted_hits = server.hits()
    expected = tree(tmp_path / "a" / "out")

    process: dict[str, subprocess.Popen] = {}
    kill_at = uninterrupted_hits // 2

    def kill_halfway(kind: str, prompt: str, hit: int) -> Reply | None:
        if server_b.hits() >= kill_at and "proc" in process:
            process["proc"].send_signal(signal.SIGKILL)
        return None

    killer = ScriptedAssistantLLM(example_project, specs, faults=kill_halfway)
    with ScriptedOpenAIServer(killer) as server_b:
        config = write_llm_config(tmp_path / "llm.yml", server_b.base_url)
        out = tmp_path / "b" / "out"
        command = [
            sys.executable,
            "-m",
            "recipe",
            "prepare-data",
            *specs,
            "-o",
            str(out),
            "--no-progress",
            "--num-rephrases",
            "3",
            "--max-concurrency",
            "1",
            "--rephrase-config",
            str(config),
            "--teacher-config",
            str(config),
            "--oracle-config",
            str(config),
        ]
        process["proc"] = subprocess.Popen(
            command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert process["proc"].wait(timeout=120) == -signal.SIGKILL
        hits_before = server_b.hits()
        process.clear()
        assert kill_at <= hits_before < uninterrupted_hits
        assert main(command[3:]) == 0
        total_hits = server_b.hits()
    # Only the call in flight when the process died is asked again.
    assert total_hits - uninterrupted_hits <= 1
    resumed = tree(out)
    assert resumed.keys() == expected.keys()
    # params.yaml names the output folder; the summary's usage section describes this run (cache hits, calls).
    differing = [name for name in expected if resumed[name] != expected[name]]
    assert set(differing) <= {"params.yaml", "result_summary.yaml"}
    summaries = [read_yaml(folder / "result_summary.yaml") for folder in (out, tmp_path / "a" / "out")]
    for summary in summaries:  # what describes the run, not the data: calls, costs, test cases taken from the cache
        for key in ("llm_usage", "estimated_cost_usd", "test_cases_reused"):
            summary["recipe"].pop(key)
    assert summaries[0] == summaries[1]


def test_loose_validation_labels_a_paraphrase_with_the_oracles_commands(tmp_path, example_project):
    responder = ScriptedAssistantLLM(example_project, SPECS[:1])
    with ScriptedOpenAIServer(responder) as server:
        result = prepare_data(
            example_project, llm_config(example_project, tmp_path, server, tests=SPECS[:1], validation="loose")
        )
    assert result.summary["recipe"]["rephrasings"]["failing"] == 0  # names agree, values are not compared
    rows = read_jsonl(tmp_path / "out/3_llm_finetune_data/llm_ft_data.jsonl")
    changed = [
        row
        for row in rows
        if (row["rephrased_user_utterance"] or "").startswith("Actually ") and "set slot" in row["output"]
    ]
    # The paraphrase that says another value is trained on the value it says, never on the original one.
    assert changed and all(CHANGED_VALUE in row["output"] for row in changed)


def test_rephrase_config_may_name_a_model_group_of_endpoints_yml(tmp_path, example_project):
    from recipe.llm_roles import load_rephrase_config

    project_dir = tmp_path / "assistant"
    project_dir.mkdir()
    (project_dir / "endpoints.yml").write_text(
        "model_groups:\n  - id: rephraser\n    models:\n      - provider: self-hosted\n        model: my-llm\n"
        "        api_base: http://127.0.0.1:9/v1\n        timeout: 7\n"
    )
    config = tmp_path / "rephrase.yml"
    config.write_text("llm:\n  model_group: rephraser\nprompt_template: custom.jinja2\n")
    (tmp_path / "custom.jinja2").write_text("Rephrase {{ user_messages | length }} messages")
    llm, template = load_rephrase_config(config, project_dir)
    assert (llm.provider, llm.model, llm.api_base, llm.timeout) == ("self-hosted", "my-llm", "http://127.0.0.1:9/v1", 7)
    assert template is not None and template.text.startswith("Rephrase")
    config.write_text("llm:\n  model_group: missing\n")
    with pytest.raises(Exception, match="model_group `missing` not found"):
        load_rephrase_config(config, project_dir)


def test_split_suites_written_outside_the_project_still_read_with_their_fixtures(prepared_example, example_project):
    from recipe.testcases import all_test_cases, load_tests

    for side in ("train", "validation"):
        suites = prepared_example / "4_train_test_split" / "e2e_tests" / side
        cases = all_test_cases(load_tests([str(suites)], example_project))
        assert cases
        assert any(case.fixture_slots for case in cases) or side == "validation"
    train_cases = all_test_cases(
        load_tests([str(prepared_example / "4_train_test_split/e2e_tests/train")], example_project)
    )
    logged_in = [c for c in train_cases if ("user_logged_in", True) in c.fixture_slots]
    assert logged_in, "the conftest fixture `logged_in_user` is found beside the split suites"


def test_abstention_rows_teach_cannot_handle_for_turns_without_commands(tmp_path: Path):
    tests = tmp_path / "tests.yml"
    tests.write_text(
        "test_cases:\n"
        "  - test_case: gibberish then a hotel\n"
        "    steps:\n"
        "      - user: asdf qwerty\n"
        "        commands: []\n"
        "      - user: I need a hotel in Porto\n"
        "        commands: [start flow book_hotel, set slot hotel_city Porto]\n"
    )
    for flag, expected in (([], 1), (["--abstention-rows"], 2)):
        out = tmp_path / f"out{len(flag)}"
        assert (
            main(
                [
                    "prepare-data",
                    str(tests),
                    "--offline",
                    "--no-progress",
                    "--num-rephrases",
                    "0",
                    "--train-frac",
                    "1",
                    "-o",
                    str(out),
                    *flag,
                ]
            )
            == 0
        )
        rows = read_jsonl(out / "3_llm_finetune_data/llm_ft_data.jsonl")
        assert len(rows) == expected
        assert ("cannot handle" in [r["output"] for r in rows]) == bool(flag)


def test_teacher_commands_that_contradict_the_assertions_are_reported_and_left_out(tmp_path, example_project):
    spec = ["e2e_tests/e2e/classic_conversations.yml::classic car rental cancelled"]

    def wrong_teacher(kind: str, prompt: str, hit: int) -> Reply | None:
        if kind == "commands" and '"""rent me a compact car in Bologna"""' in prompt:
            return Reply.text("start flow book_hotel")  # the test says a car rental starts
        return None

    responder = ScriptedAssistantLLM(example_project, spec, faults=wrong_teacher)
    with ScriptedOpenAIServer(responder) as server:
        result = prepare_data(
            example_project, llm_config(example_project, tmp_path, server, tests=spec, num_rephrases=0)
        )
    skipped = result.summary["recipe"]["skipped_turns"]
    assert skipped[0]["turn"] == 1 and "disagree with the test's assertions" in skipped[0]["reason"]
    # The state after a turn with unknown commands is a guess: the later turns of the test yield no rows either.
    assert [s["turn"] for s in skipped] == [1, 2, 3]
    assert all("comes after turn 1" in s["reason"] for s in skipped[1:])
    assert read_jsonl(tmp_path / "out/3_llm_finetune_data/llm_ft_data.jsonl") == []


def test_split_suites_are_written_in_the_runs_command_syntax(prepared_example: Path):
    suites = prepared_example / "4_train_test_split" / "e2e_tests"
    commands = [
        line
        for f in suites.rglob("*.yml")
        for case in (read_yaml(f) or {}).get("test_cases", [])
        for step in case["steps"]
        for line in step.get("commands", [])
    ]
    assert commands and all(parse_command(line, [Syntax.V2]) for line in commands)
    short = list(suites.rglob("short_dialect_commands.yml"))
    assert short and all("start flow" in f.read_text() for f in short)  # the short dialect was rewritten


def test_the_data_does_not_depend_on_the_folder_the_command_runs_from(tmp_path: Path, monkeypatch):
    root = Path.cwd()
    here = tmp_path / "from_root"
    assert (
        main(
            ["prepare-data", "e2e_tests/hotels", "--offline", "--no-progress", "--num-rephrases", "2", "-o", str(here)]
        )
        == 0
    )
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "from_elsewhere"
    # The tests path is given relative to --project: it is found there.
    assert (
        main(
            [
                "prepare-data",
                "e2e_tests/hotels",
                "--project",
                str(root),
                "--offline",
                "--no-progress",
                "--num-rephrases",
                "2",
                "-o",
                str(elsewhere),
            ]
        )
        == 0
    )
    for name in (
        "3_llm_finetune_data/llm_ft_data.jsonl",
        "4_train_test_split/ft_splits/train.jsonl",
        "4_train_test_split/ft_splits/val.jsonl",
    ):
        assert (here / name).read_text() == (elsewhere / name).read_text(), name
    assert sorted(p.relative_to(here) for p in (here / "1_command_annotations").rglob("*.yaml")) == sorted(
        p.relative_to(elsewhere) for p in (elsewhere / "1_command_annotations").rglob("*.yaml")
    )


def test_template_mistakes_are_reported_not_rendered_silently(tmp_path: Path, capsys, caplog):
    broken = tmp_path / "broken.jinja2"
    broken.write_text("{% for f in available_flows %}{{ f.nme.upper() }}{% endfor %}{{ user_message }}")
    assert (
        main(
            [
                "prepare-data",
                "e2e_tests/hotels",
                "--offline",
                "--no-progress",
                "--prompt-template",
                str(broken),
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"{broken}: the template fails to render")
    typo = tmp_path / "typo.jinja2"
    typo.write_text("{{ avaliable_flows }} StartFlow(x) {{ user_message }}")
    with caplog.at_level("WARNING", logger="recipe"):
        assert (
            main(
                [
                    "prepare-data",
                    "e2e_tests/hotels",
                    "--offline",
                    "--no-progress",
                    "--num-rephrases",
                    "0",
                    "--prompt-template",
                    str(typo),
                    "-o",
                    str(tmp_path / "t"),
                ]
            )
            == 0
        )
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "`avaliable_flows`" in warnings and "render empty" in warnings
    assert "but the completions use v2" in warnings  # the template describes v1 commands


def test_failed_llm_calls_make_the_run_exit_1_and_keep_the_rows(tmp_path: Path, example_project, capsys):
    responder = ScriptedAssistantLLM(
        example_project, SPECS[:1], faults=lambda kind, prompt, hit: Reply.error(400) if kind == "rephrase" else None
    )
    with ScriptedOpenAIServer(responder) as server:
        config = write_llm_config(tmp_path / "llm.yml", server.base_url)
        code = main(
            [
                "prepare-data",
                SPECS[0],
                "-o",
                str(tmp_path / "out"),
                "--no-progress",
                "--num-rephrases",
                "2",
                "--rephrase-config",
                str(config),
                "--teacher-config",
                str(config),
            ]
        )
    assert code == 1
    assert "failed after retries" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "out/4_train_test_split/ft_splits/train.jsonl")  # the original rows are there


def test_teacher_and_oracle_configs_are_read_alike_and_may_name_a_model_group(tmp_path, example_project):
    from recipe.llm_roles import DEFAULT_TEACHER_MODEL, load_llm_role_config

    project_dir = tmp_path / "assistant"
    project_dir.mkdir()
    (project_dir / "endpoints.yml").write_text(
        "model_groups:\n  - id: oracle\n    models:\n      - {provider: self-hosted, model: judge, "
        "api_base: 'http://127.0.0.1:9/v1'}\n"
    )
    grouped, inline = tmp_path / "grouped.yml", tmp_path / "inline.yml"
    grouped.write_text("llm:\n  model_group: oracle\n")
    inline.write_text("provider: self-hosted\nmodel: judge\napi_base: http://127.0.0.1:9/v1\n")
    from_group = load_llm_role_config(grouped, project_dir, DEFAULT_TEACHER_MODEL)
    assert from_group == load_llm_role_config(inline, project_dir, DEFAULT_TEACHER_MODEL)
    assert (from_group.model, from_group.temperature) == ("judge", DEFAULT_TEACHER_MODEL.temperature)


def test_the_cli_defaults_are_prepare_configs() -> None:
    """PrepareConfig is the single source of prepare-data's defaults: every flag that sets one of its fields
    defaults to the same value."""
    import argparse
    import dataclasses

    from recipe.cli import prepare_data as cli
    from recipe.prepare import PrepareConfig

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = vars(parser.parse_args(["prepare-data"]))
    fields = {f.name: f.default for f in dataclasses.fields(PrepareConfig) if f.default is not dataclasses.MISSING}
    shared = sorted(set(fields) & set(args) - {"offline"})  # --offline is a switch; the config says what was decided
    assert {
        "num_rephrases",
        "train_frac",
        "output_format",
        "seed",
        "annotator",
        "validation",
        "max_concurrency",
    } <= set(shared)
    assert {name: args[name] for name in shared} == {name: fields[name] for name in shared}


def test_an_offline_run_nobody_asked_for_says_why(tmp_path: Path, monkeypatch, caplog) -> None:
    # the tests run from the repository root (tests/conftest.py)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = ["prepare-data", "--no-progress", "--num-rephrases", "0", "-o", str(tmp_path / "out"), SPECS[0]]
    assert main(argv) == 0
    assert "no LLM is configured" in caplog.text and "running offline" in caplog.text
    caplog.clear()
    assert main([*argv, "--offline"]) == 0
    assert "running offline" not in caplog.text
