"""Every failure counted, loud and recoverable: `prepare-data` against a real scripted server on 127.0.0.1 that fails
in scripted ways (HTTP errors, a rejected key, an unknown model, cut and empty answers, nothing listening), and real
processes stopped with real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prepare_llm import ScriptedAssistantLLM, write_llm_config
from ruamel.yaml import YAML

from recipe.cli import main
from recipe.commands import Syntax
from recipe.llm import LLMConfig
from recipe.prepare import PrepareConfig, prepare_data
from recipe.prompt import PROMPTS_DIR, DatetimePolicy, choose_template, load_template
from recipe.testing.openai_server import Reply, ScriptedOpenAIServer

DU = "e2e_tests/hotels/hotel_du.yml"  # commands given: the oracle is the only "commands" caller
CLASSIC = "e2e_tests/e2e/classic_conversations.yml"  # no commands: the teacher annotates


def read_yaml(path: Path):
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def run_files(folder: Path) -> dict[str, str]:
    """Every file of the run in `folder`: the shared cache and an unfinished run's staging folder left out."""
    return {
        str(p.relative_to(folder)): p.read_text(encoding="utf-8")
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in ("cache", ".staging")
    }


def config_for(project, out: Path, server: ScriptedOpenAIServer, tests: list[str], **overrides) -> PrepareConfig:
    llm = LLMConfig(provider="self-hosted", model="scripted-model", api_base=server.base_url, timeout=2.0)
    settings = dict(
        tests=tests,
        out=out,
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
        backoff_base_s=0.01,
    )
    settings.update(overrides)
    return PrepareConfig(**settings)


def cli(tmp_path: Path, config: Path, *tests: str, out: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "prepare-data",
        *(tests or (DU,)),
        "-o",
        str(out or tmp_path / "out"),
        "--no-progress",
        "--num-rephrases",
        "2",
        "--rephrase-config",
        str(config),
        "--teacher-config",
        str(config),
        *extra,
    ]


def default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal (a shell starts background jobs with SIGINT ignored, inherited here)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- silent loss


def test_every_failed_oracle_call_is_counted_printed_and_exits_1(tmp_path, example_project, capsys):
    responder = ScriptedAssistantLLM(
        example_project, [DU], faults=lambda kind, prompt, hit: Reply.error(400) if kind == "commands" else None
    )
    with ScriptedOpenAIServer(responder) as server:
        code = main(cli(tmp_path, write_llm_config(tmp_path / "llm.yml", server.base_url)))
    err = capsys.readouterr().err
    assert code == 1
    summary = read_yaml(tmp_path / "out/result_summary.yaml")["recipe"]
    failed = summary["failed_llm_calls"]["oracle"]
    assert failed == summary["rephrasings"]["received"] > 0  # every paraphrase's check failed, each counted
    assert summary["errors"] and all("oracle" in error for error in summary["errors"])
    assert f"oracle: {failed} LLM call(s) failed" in err


def test_every_failed_teacher_call_is_counted_and_exits_1(tmp_path, example_project, capsys):
    responder = ScriptedAssistantLLM(
        example_project, [CLASSIC], faults=lambda kind, prompt, hit: Reply.error(400) if kind == "commands" else None
    )
    with ScriptedOpenAIServer(responder) as server:
        code = main(
            cli(
                tmp_path,
                write_llm_config(tmp_path / "llm.yml", server.base_url),
                CLASSIC,
                extra=("--num-rephrases", "0"),
            )
        )
    assert code == 1
    summary = read_yaml(tmp_path / "out/result_summary.yaml")["recipe"]
    assert summary["failed_llm_calls"]["teacher"] > 0
    assert any("teacher" in error for error in summary["errors"])
    assert "teacher: " in capsys.readouterr().err


def test_a_role_whose_calls_keep_failing_stops_being_called_and_the_run_finishes(tmp_path, example_project):
    responder = ScriptedAssistantLLM(
        example_project, [DU], faults=lambda kind, prompt, hit: Reply.error(500) if kind == "commands" else None
    )
    with ScriptedOpenAIServer(responder) as server:
        result = prepare_data(
            example_project, config_for(example_project, tmp_path / "out", server, [DU], max_concurrency=2)
        )
    summary = result.summary["recipe"]
    usage = summary["llm_usage"]["oracle"]
    assert "oracle" in summary["llm_roles_down"] and usage["not_sent"] > 0
    assert summary["failed_llm_calls"]["oracle"] == summary["rephrasings"]["received"]  # sent or not, all counted
    # 20 failed calls in a row (plus those already in flight), each after 7 attempts; then nothing more is sent.
    assert responder.kinds["commands"] <= (20 + 2) * 7 < 7 * summary["rephrasings"]["received"]
    assert result.train_rows > 0  # the original rows are unaffected


# ---------------------------------------------------------------------------------------------- configuration


def test_a_wrong_key_stops_before_any_paid_call_with_one_line_and_exit_2(tmp_path, example_project, capsys):
    key = "sk-proj-right0123456789abcdef"
    wrong = "sk-proj-wrong0123456789abcdef"
    with ScriptedOpenAIServer(ScriptedAssistantLLM(example_project, [DU]), api_key=key) as server:
        config = tmp_path / "llm.yml"
        config.write_text(
            f"llm:\n  provider: self-hosted\n  model: scripted-model\n  api_base: {server.base_url}\n"
            "  api_key_env: MY_LLM_KEY\n"
        )
        os.environ["MY_LLM_KEY"] = wrong
        try:
            code = main(cli(tmp_path, config))
        finally:
            del os.environ["MY_LLM_KEY"]
        assert server.hits() == 0  # nothing paid
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "the rephraser" in line and server.base_url in line and "401" in line
    assert "MY_LLM_KEY" in line and wrong not in line and "wrong0123" not in line  # the echoed key is redacted
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_stops_before_any_paid_call(tmp_path, example_project, capsys):
    with ScriptedOpenAIServer(ScriptedAssistantLLM(example_project, [DU]), only_model=True) as server:
        config = tmp_path / "llm.yml"
        config.write_text(f"llm:\n  provider: self-hosted\n  model: scripted-modle\n  api_base: {server.base_url}\n")
        code = main(cli(tmp_path, config))
        assert server.hits() == 0
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "scripted-modle" in line and "scripted-model" in line and "the rephraser" in line


def test_a_401_in_the_middle_of_a_run_stops_it_at_once(tmp_path, example_project, capsys):
    # The model list answers (the key was fine then), every completion is refused: the key was revoked mid-run.
    responder = ScriptedAssistantLLM(example_project, [DU], faults=lambda kind, prompt, hit: Reply.error(401))
    with ScriptedOpenAIServer(responder) as server:
        code = main(
            cli(tmp_path, write_llm_config(tmp_path / "llm.yml", server.base_url), extra=("--max-concurrency", "2"))
        )
        hits = server.hits()
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "401" in line and "stopped at once" in line
    assert hits <= 2 * 3  # the calls in flight per role, never the whole run


def test_an_unreachable_endpoint_stops_within_seconds(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_llm_config(tmp_path / "llm.yml", f"http://127.0.0.1:{port}/v1", timeout=30)
    started = time.monotonic()
    code = main(cli(tmp_path, config))
    elapsed = time.monotonic() - started
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "cannot be reached" in line and elapsed < 15


# ---------------------------------------------------------------------------------------------- poisoned cache


@pytest.mark.parametrize(
    "bad", [Reply.text("start fl", finish_reason="length"), Reply.text("")], ids=["cut at the token limit", "empty"]
)
def test_cut_or_empty_answers_are_retried_counted_and_never_cached(tmp_path, example_project, bad):
    faulty = ScriptedAssistantLLM(
        example_project, [DU], faults=lambda kind, prompt, hit: bad if kind == "commands" else None
    )
    with ScriptedOpenAIServer(faulty) as server:
        broken = prepare_data(example_project, config_for(example_project, tmp_path / "out", server, [DU]))
    summary = broken.summary["recipe"]
    oracle = summary["llm_usage"]["oracle"]
    assert summary["failed_llm_calls"]["oracle"] > 0 and summary["rephrasings"]["passing"] == 0
    if bad.finish_reason == "length":
        # Asked once again, then reported (calls refused once the oracle was down were asked fewer times).
        assert 2 * (oracle["failures"] - oracle["not_sent"]) <= oracle["truncated"] <= 2 * oracle["failures"]
        assert "raise max_completion_tokens in the oracle's LLM config" in summary["errors"][0]
    else:
        assert oracle["empty_answers"] >= 7 * (oracle["failures"] - oracle["not_sent"])  # every retry spent
    # The same run against a healthy server asks those calls again (nothing broken was cached) and loses nothing.
    healthy = ScriptedAssistantLLM(example_project, [DU])
    with ScriptedOpenAIServer(healthy) as server:
        fixed = prepare_data(example_project, config_for(example_project, tmp_path / "out", server, [DU]))
        clean = prepare_data(example_project, config_for(example_project, tmp_path / "clean", server, [DU]))
    assert healthy.kinds["commands"] >= oracle["failures"] > 0
    assert fixed.summary["recipe"]["failed_llm_calls"]["oracle"] == 0
    assert (fixed.train_rows, fixed.val_rows) == (clean.train_rows, clean.val_rows)
    assert fixed.summary["recipe"]["rephrasings"] == clean.summary["recipe"]["rephrasings"]


def test_the_same_model_behind_another_port_pays_nothing_again(tmp_path, example_project):
    with ScriptedOpenAIServer(ScriptedAssistantLLM(example_project, [DU])) as first:
        prepare_data(example_project, config_for(example_project, tmp_path / "out", first, [DU]))
        assert first.hits() > 0
    with ScriptedOpenAIServer(ScriptedAssistantLLM(example_project, [DU])) as moved:
        again = prepare_data(example_project, config_for(example_project, tmp_path / "out", moved, [DU]))
        assert moved.hits() == 0
    assert again.summary["recipe"]["failed_llm_calls"] == {"rephraser": 0, "oracle": 0, "teacher": 0}
    # A setting that changes the answer is a new request.
    with ScriptedOpenAIServer(ScriptedAssistantLLM(example_project, [DU])) as warmer:
        llm = LLMConfig(provider="self-hosted", model="scripted-model", api_base=warmer.base_url, temperature=0.7)
        prepare_data(example_project, config_for(example_project, tmp_path / "out", warmer, [DU], oracle_llm=llm))
        assert warmer.hits() > 0


# ---------------------------------------------------------------------------------------------- outputs


def test_a_rerun_with_a_bad_template_leaves_the_previous_run_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare-data", DU, "--offline", "--no-progress", "-o", str(out)]) == 0
    before = run_files(out)
    broken = tmp_path / "broken.jinja2"
    broken.write_text("{{ user_message }}{{ current_conversation | int(1, 2, 3, 4) }}")
    capsys.readouterr()
    assert (
        main(["prepare-data", DU, "--offline", "--no-progress", "-o", str(out), "--prompt-template", str(broken)]) == 2
    )
    assert str(broken) in one_line(capsys.readouterr().err)
    assert run_files(out) == before
    assert {p.name for p in out.iterdir()} - {"cache"} == {name.split("/", 1)[0] for name in before}


def test_bad_output_folders_are_one_line_and_exit_2(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "t.yml").write_text(Path(DU).read_text())
    for out, words in ((a_file, "is a file"), (a_file / "sub", "is not a folder"), (tests / "out", "inside the tests")):
        assert main(["prepare-data", str(tests), "--offline", "--no-progress", "-o", str(out)]) == 2
        assert words in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tests.iterdir()) == ["t.yml"]


def test_an_interrupted_run_keeps_the_previous_outputs_and_resumes_without_paying_twice(tmp_path, example_project):
    out = tmp_path / "out"
    process: dict[str, subprocess.Popen] = {}

    def interrupt_halfway(kind: str, prompt: str, hit: int) -> Reply | None:
        if "proc" in process and kind == "commands" and hit == 3:
            process["proc"].send_signal(signal.SIGINT)
            time.sleep(0.5)  # the answer arrives after the interrupt: it is never cached
        return None

    responder = ScriptedAssistantLLM(example_project, [DU], faults=interrupt_halfway)
    with ScriptedOpenAIServer(responder) as server:
        config = write_llm_config(tmp_path / "llm.yml", server.base_url)
        command = cli(tmp_path, config, out=out, extra=("--max-concurrency", "1"))
        assert main(command) == 0
        first_oracle = responder.kinds["commands"]
        before = run_files(out)
        responder.kinds.clear()
        (tmp_path / "other.jinja2").write_text(
            Path(choose_template(example_project, Syntax.V2).path).read_text() + "\n"
        )  # a changed prompt: every oracle call is new
        changed = [*command, "--prompt-template", str(tmp_path / "other.jinja2")]
        process["proc"] = subprocess.Popen(
            [sys.executable, "-m", "recipe", *changed],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        _, err = process["proc"].communicate(timeout=120)
        assert process.pop("proc").returncode == 130
        assert run_files(out) == before  # the previous run is intact
        assert "interrupted" in err and "run the same command again" in err and "Traceback" not in err
        hits_before = server.hits()
        assert main(changed) == 0
        resumed_hits = server.hits() - hits_before
    assert first_oracle - 3 <= resumed_hits <= first_oracle - 2  # only the unanswered calls are asked again
    assert run_files(out) != before and not (out / ".staging").exists()


# ---------------------------------------------------------------------------------------------- secrets


def test_a_key_echoed_by_the_server_is_redacted_everywhere(tmp_path, example_project, capsys):
    key = "sk-proj-Secret0123456789abcdefXYZ"
    responder = ScriptedAssistantLLM(
        example_project,
        [DU],
        faults=lambda kind, prompt, hit: (
            Reply.error(400, message=f"invalid request made with key {key} (sk-proj-****************fXYZ)")
            if kind == "commands"
            else None
        ),
    )
    with ScriptedOpenAIServer(responder) as server:
        config = tmp_path / "llm.yml"
        config.write_text(
            f"llm:\n  provider: self-hosted\n  model: scripted-model\n  api_base: {server.base_url}\n"
            "  api_key_env: MY_LLM_KEY\n"
        )
        os.environ["MY_LLM_KEY"] = key
        try:
            assert main(cli(tmp_path, config)) == 1
        finally:
            del os.environ["MY_LLM_KEY"]
    texts = [capsys.readouterr().err] + [p.read_text() for p in (tmp_path / "out").rglob("*.y*ml")]
    assert "[redacted]" in (tmp_path / "out/result_summary.yaml").read_text()
    for text in texts:
        assert "Secret0123" not in text and "fXYZ" not in text


# ---------------------------------------------------------------------------------------------- hostile inputs


def _suite(folder: Path) -> Path:
    folder.mkdir()
    for name in ("hotel_du.yml", "conftest.yml"):
        if (Path("e2e_tests/hotels") / name).exists():
            (folder / name).write_text((Path("e2e_tests/hotels") / name).read_text())
    for conftest in Path("e2e_tests").glob("conftest.y*ml"):
        (folder / conftest.name).write_text(conftest.read_text())
    return folder


def test_hostile_inputs_are_one_line_each_without_a_traceback(tmp_path, capsys):
    bomb = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(9))
    cases = {
        "alias bomb": (
            "bomb.yml",
            "test_cases:\n  - test_case: t\n    steps:\n      - user: hi\n" + bomb,
            "alias bomb",
        ),  # 9**9 values once expanded
        "deep nesting": ("deep.yml", "test_cases: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    }
    for name, (file_name, text, words) in cases.items():
        suite = _suite(tmp_path / name.replace(" ", "_"))
        (suite / file_name).write_text(text)
        started = time.monotonic()
        assert main(["prepare-data", str(suite), "--offline", "--no-progress", "-o", str(tmp_path / "o")]) == 2
        assert words in one_line(capsys.readouterr().err) and time.monotonic() - started < 30, name
    loop = _suite(tmp_path / "loop")
    (loop / "a.yml").symlink_to("b.yml")
    (loop / "b.yml").symlink_to("a.yml")
    assert main(["prepare-data", str(loop), "--offline", "--no-progress", "-o", str(tmp_path / "o")]) == 2
    # Both files of the loop are reported, one line each (every problem of a run is listed).
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(loop / "a.yml"), str(loop / "b.yml")]
    assert all("symbolic link" in line and "Traceback" not in line for line in lines)
    latin1 = tmp_path / "latin1.jinja2"
    latin1.write_bytes("Caf\xe9 {{ user_message }}".encode("latin-1"))
    assert (
        main(
            [
                "prepare-data",
                DU,
                "--offline",
                "--no-progress",
                "-o",
                str(tmp_path / "o"),
                "--prompt-template",
                str(latin1),
            ]
        )
        == 2
    )
    assert "not UTF-8" in one_line(capsys.readouterr().err)
    project = tmp_path / "assistant"
    project.mkdir()
    (project / "endpoints.yml").write_text("model_groups:\n  rephraser:\n    models: [{provider: openai}]\n")
    config = tmp_path / "rephrase.yml"
    config.write_text("llm:\n  model_group: rephraser\n")
    from recipe.errors import ConfigError
    from recipe.llm_roles import load_rephrase_config

    with pytest.raises(ConfigError, match="`model_groups` must be a list"):
        load_rephrase_config(config, project)
