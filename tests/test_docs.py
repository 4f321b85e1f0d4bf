"""Every command and code block in README.md, docs/ and finetune/README.md is run or checked.

Each ```bash / ```python block carries a marker on the line before it:

* `<!-- doc-test: run -->` runs as written (bash: `set -e`), in a fresh copy of the bundled example assistant;
* `<!-- doc-test: serve -->` is a server: started in the background, waited for, stopped at the end;
* `<!-- doc-test: run-on-smoke (...) -->` runs against the smoke model of the README's first hour, with the names
  of the real run (`runs/cmdgen`, `cmdgen-wayfarer`, `path/to/assistant`) mapped to it;
* `<!-- doc-test: flags (reason) -->` needs a GPU, a paid endpoint, Rasa Pro or the CI's clean machine: bash is
  checked with `bash -n`, python with `compile`, and every `recipe ...` command is parsed by recipe's own argument
  parser, so a renamed or missing flag fails here.

The README's first hour (prepare-data, finetune --smoke, serve, evaluate, rasa-config) is one test, step by step.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "finetune" / "README.md"]
MARKER = re.compile(r"<!-- doc-test: ([a-z-]+)(?: \((.+)\))? -->")
KINDS = {"run", "serve", "run-on-smoke", "flags"}
SMOKE_NAMES = {"runs/cmdgen": "runs/smoke", "cmdgen-wayfarer": "smoke", "path/to/assistant": "."}
RECIPE = shutil.which("recipe") or "recipe"


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence
    language: str
    kind: str | None
    reason: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def code_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[index].strip())
        if not fence:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.fullmatch(previous.strip())
        blocks.append(
            Block(
                doc,
                index + 1,
                fence.group(1),
                marker.group(1) if marker else None,
                marker.group(2) if marker else None,
                "\n".join(lines[index + 1 : end]) + "\n",
            )
        )
        index = end + 1
    return blocks


ALL_BLOCKS = [block for doc in DOCS for block in code_blocks(doc)]
CODE_BLOCKS = [block for block in ALL_BLOCKS if block.language in ("bash", "python")]


def commands_of(script: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at && ; | &."""
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if set(token) <= set(";&|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def recipe_arguments(command: list[str]) -> list[str] | None:
    """The arguments after `recipe` (also `python -m recipe`, `accelerate launch ... -m recipe`), else None. An
    ellipsis right after the subcommand stands for "the flags above" and is dropped; any other is a value."""
    found = None
    if command and command[0] == "recipe":
        found = command[1:]
    for index in range(len(command) - 1):
        if command[index] == "-m" and command[index + 1] == "recipe":
            found = command[index + 2 :]
    if found is None:
        return None
    return [value for i, value in enumerate(found) if not (value == "..." and i == 1)] if found else found


# ---------------------------------------------------------------------------------------------- every block


def test_every_code_block_is_run_or_checked():
    unmarked = [block.where for block in CODE_BLOCKS if block.kind not in KINDS]
    assert not unmarked, f"add a <!-- doc-test: ... --> marker before each of {unmarked}"
    unexplained = [block.where for block in CODE_BLOCKS if block.kind == "flags" and not block.reason]
    assert not unexplained, f"say why these are only checked: {unexplained}"
    assert sum(block.kind == "run" for block in CODE_BLOCKS) >= 4


@pytest.mark.parametrize("block", [b for b in CODE_BLOCKS if b.kind == "flags"], ids=lambda b: b.where)
def test_blocks_that_need_a_gpu_or_a_service_are_valid_and_use_real_flags(block):
    from recipe.cli import build_parser

    if block.language == "python":
        compile(block.text, block.where, "exec")
        return
    syntax = subprocess.run(["bash", "-n"], input=block.text, check=False, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.where}: {syntax.stderr}"
    for command in commands_of(block.text):
        arguments = recipe_arguments(command)
        if arguments is None:
            continue
        try:
            build_parser().parse_args(arguments)
        except SystemExit as exit:
            pytest.fail(f"{block.where}: `recipe {shlex.join(arguments)}` is refused by the parser ({exit.code})")


def test_the_hub_login_command_is_the_one_the_pinned_client_has():
    for doc in DOCS + [ROOT / "finetune" / "finetune.ipynb"]:
        text = doc.read_text(encoding="utf-8")
        assert "huggingface-cli login`" not in text.replace("(`huggingface-cli login` is gone", ""), doc


def test_render_prompt_help_names_a_test_that_exists():
    from recipe.project import load_project
    from recipe.testcases import load_tests

    help_text = subprocess.run(
        [RECIPE, "render-prompt", "--help"], check=False, capture_output=True, text=True, cwd=ROOT
    ).stdout
    example = re.search(r"'(e2e_tests/\S+?\.yml)::([^']+)'", " ".join(help_text.split()))
    assert example, help_text
    names = [case.name for file in load_tests([example.group(1)], load_project(ROOT)) for case in file.test_cases]
    assert example.group(2) in names


# ---------------------------------------------------------------------------------------------- running them


def example_workspace(folder: Path) -> Path:
    """The bundled example assistant, as a fresh clone has it, without recipe's own outputs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("flows", "e2e_tests"):
        shutil.copytree(ROOT / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_port(text: str, port: int) -> str:
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}")


def run_bash(block_text: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block_text],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"{block_text}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def user_env(home: Path) -> dict[str, str]:
    """A new user's environment: no keys, a home (and model cache) of their own, recipe on the PATH."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PYTHONPATH": ""}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def section_blocks(doc: Path, heading: str) -> list[Block]:
    text = doc.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(text) if line.strip() == heading) + 1
    end = next((i for i in range(start, len(text)) if text[i].startswith("## ")), len(text)) + 1
    return [block for block in code_blocks(doc) if start <= block.line <= end and block.language in ("bash", "python")]


def wait_for_health(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}: {server.stderr.read() if server.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory):
    """The README from a fresh clone: the set-up's main job, then the first hour's blocks in order (the server in
    the background). Yields (workspace, port, env, outputs of the run blocks) while the server still runs."""
    work = example_workspace(tmp_path_factory.mktemp("first-hour") / "clone")
    env = user_env(work.parent / "home")
    setup = next(b for b in CODE_BLOCKS if b.doc.name == "README.md" and b.text.startswith("pip install -e . &&"))
    main_job = next(c for c in commands_of(setup.text) if c[0] == "recipe")  # after `pip install -e .`
    run_bash(shlex.join(main_job), work, env)
    port = free_port()
    blocks = section_blocks(ROOT / "README.md", "## The first hour, on a CPU")
    assert [b.kind for b in blocks] == ["run", "serve", "run"], [b.where for b in blocks]
    outputs, server = [], None
    try:
        for block in blocks:
            text = with_port(block.text, port)
            if block.kind == "serve":
                (command,) = commands_of(text)
                server = subprocess.Popen(
                    command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                wait_for_health(f"http://127.0.0.1:{port}/health", server)
            else:
                outputs.append(run_bash(text, work, env))
        yield work, port, env, outputs
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def test_first_hour_trains_a_model_that_reloads_with_its_card(first_hour):
    work, _, _, outputs = first_hour
    run = work / "runs" / "smoke"
    info = json.loads((run / "recipe_training_info.json").read_text())
    training = info["training"]
    assert training["quantization"] == "none" and training["data"]["train"]["rows"] == 48
    assert Path(training["base_model"]).is_relative_to(work.parent / "home" / ".cache" / "recipe" / "tiny-model")
    assert info["prompt_template_text"] and info["command_syntax"] == "v2"
    for name in ("adapter_model.safetensors", "merged/model.safetensors", "loss_curves.png", "README.md"):
        assert (run / name).is_file(), name
    log = outputs[0].stderr
    assert "step 36/36" in log and "val loss" in log
    assert "{'loss'" not in log and "it/s]" not in log, "no trainer dicts or progress bars in a log file"


def test_the_model_card_shows_what_print_vllm_command_prints(first_hour):
    work, _, env, _ = first_hour
    card = (work / "runs" / "smoke" / "README.md").read_text()
    for extra in ([], ["--vllm-adapter"]):
        printed = subprocess.run(
            [RECIPE, "serve", "--model", "runs/smoke", "--name", "cmdgen", "--print-vllm-command", *extra],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert printed and printed in card, printed
    assert "rasa-formats" not in card and "known-weaknesses" not in card, "the card cites files a user does not have"


def test_first_hour_evaluates_the_served_model(first_hour):
    work, port, _, outputs = first_hour
    report = json.loads((work / "runs" / "smoke" / "evaluation" / "report.json").read_text())
    (model,) = report.get("models", [report])
    assert f"127.0.0.1:{port}" in json.dumps(model)
    assert "turn accuracy" in outputs[1].stdout and "report:" in outputs[1].stdout
    assert (work / "runs" / "smoke" / "evaluation" / "report.md").is_file()


def test_first_hour_prints_the_rasa_config(first_hour):
    _, port, _, outputs = first_hour
    printed = outputs[1].stdout
    assert "# endpoints.yml" in printed and "# config.yml" in printed
    assert "provider: self-hosted" in printed and "model: smoke" in printed
    assert f"api_base: http://127.0.0.1:{port}/v1" in printed and "CompactLLMCommandGenerator" in printed
    assert not any((ROOT / "prompts").glob("smoke*")), "rasa-config wrote into recipe's own prompts/"


@pytest.mark.parametrize("block", [b for b in CODE_BLOCKS if b.kind == "run-on-smoke"], ids=lambda b: b.where)
def test_runtime_snippets_run_against_the_served_model(first_hour, block):
    work, port, env, _ = first_hour
    code = with_port(block.text, port)
    for name, smoke in SMOKE_NAMES.items():
        code = code.replace(name, smoke)
    code += (
        "\nassert generator.setup.template.sha256 == info['prompt_template_sha256'], 'the trained template'\n"
        "print('PROMPT TOKENS', prediction.prompt_tokens)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, check=False, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{block.where}\n{result.stderr[-3000:]}"
    assert "PROMPT TOKENS" in result.stdout


def test_rasa_config_refuses_to_write_into_recipes_own_templates(first_hour):
    work, _, env, _ = first_hour
    result = subprocess.run(
        [
            RECIPE,
            "rasa-config",
            "--model",
            str(work / "runs" / "smoke"),
            "--model-name",
            "smoke",
            "--api-base",
            "http://127.0.0.1:1/v1",
            "--write-template",
            "prompts/cmdgen.jinja2",
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "recipe's own template folder" in result.stderr
    assert not (ROOT / "prompts" / "cmdgen.jinja2").exists()
    written = subprocess.run(
        [
            RECIPE,
            "rasa-config",
            "--model",
            "runs/smoke",
            "--model-name",
            "smoke",
            "--api-base",
            "http://127.0.0.1:1/v1",
            "--project",
            "assistant",
            "--write-template",
            "prompts/cmdgen.jinja2",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "prompt_template: prompts/cmdgen.jinja2" in written and "copy" not in written
    assert (work / "assistant" / "prompts" / "cmdgen.jinja2").is_file()


def test_the_teacher_endpoint_gets_the_providers_key(first_hour, monkeypatch):
    from recipe.evaluate import ModelSpec, _api_key, default_api_key_envs

    work, _, env, _ = first_hour
    teacher = subprocess.run(
        [
            RECIPE,
            "evaluate",
            "output/4_train_test_split/e2e_tests/validation",
            "--endpoint",
            "https://api.openai.com/v1",
            "--endpoint-model",
            "gpt-4o",
            "-o",
            "runs/teacher",
        ],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert teacher.returncode == 2 and "OPENAI_API_KEY" in teacher.stderr and "Traceback" not in teacher.stderr
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert _api_key(ModelSpec(endpoint="https://api.openai.com/v1", endpoint_model="gpt-4o")) == "sk-test"
    assert _api_key(ModelSpec(endpoint="http://127.0.0.1:8000/v1", endpoint_model="m")) is None
    assert default_api_key_envs("https://me.openai.azure.com/openai") == ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY")


# ---------------------------------------------------------------------------------------------- other docs' runs


@pytest.mark.parametrize(
    "doc", [ROOT / "docs" / "serving.md", ROOT / "finetune" / "README.md"], ids=lambda doc: str(doc.relative_to(ROOT))
)
def test_run_blocks_of_the_other_docs_run_from_a_fresh_clone(doc, tmp_path):
    blocks = [block for block in code_blocks(doc) if block.kind == "run"]
    assert blocks
    work = example_workspace(tmp_path / "clone")
    env = user_env(tmp_path / "home")
    for block in blocks:
        run_bash(block.text, work, env)
    assert (work / "output" / "4_train_test_split" / "ft_splits" / "train.jsonl").is_file()
    if any("--smoke" in block.text for block in blocks):
        assert (work / "runs" / "smoke" / "merged" / "model.safetensors").is_file()
