"""`recipe serve` on 127.0.0.1 with a tiny finetuned model, called through the real `openai` client and through the
runtime API; its limits and errors; the `vllm serve` command line; and `recipe rasa-config`."""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from rt_artifacts import finetuned_folder
from ruamel.yaml import YAML

from recipe.artifacts import read_training_info
from recipe.backends import LocalModelBackend, OpenAIBackend
from recipe.cli import main
from recipe.commands import Syntax, parse_model_output
from recipe.errors import ConfigError
from recipe.grammar import build_grammar
from recipe.project import load_project
from recipe.prompt import PROMPTS_DIR, load_template
from recipe.rasa_config import rasa_config
from recipe.runtime import CommandGenerator, conversation_state
from recipe.serve import ModelServer, ServeLimits, check_exposure, create_app, running_in_background, vllm_serve_command

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
NAME = "cmdgen-wayfarer"
LIMITS = ServeLimits(
    max_request_bytes=64_000, max_prompt_tokens=3000, max_tokens=24, default_max_tokens=12, max_pending=2
)


@pytest.fixture(scope="module")
def project():
    return load_project(REPO)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    return finetuned_folder(tmp_path_factory.mktemp("models"), load_template(PROMPTS_DIR / "command_prompt_v2.jinja2"))


@pytest.fixture(scope="module")
def backend(finetuned) -> LocalModelBackend:
    return LocalModelBackend(finetuned, max_new_tokens=12, threads=1)  # one thread: the test machine is shared


@pytest.fixture(scope="module")
def model_server(backend, project) -> ModelServer:
    return ModelServer(backend, NAME, LIMITS, project, Syntax.V2, api_key=KEY)


@pytest.fixture(scope="module")
def base_url(model_server):
    with running_in_background(create_app(model_server)) as url:
        yield url


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def prompt(project) -> str:
    generator = CommandGenerator.for_model(
        project, OpenAIBackend("http://127.0.0.1:1/v1", NAME), template_path=PROMPTS_DIR / "command_prompt_v2.jinja2"
    )
    return generator.render(conversation_state(project, [("user", "hi"), ("bot", "Hello!")]), "a car in Porto")


def test_serves_on_loopback_and_answers_chat_like_the_local_model(client, base_url, backend, prompt):
    assert base_url.startswith("http://127.0.0.1:")
    response = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=10
    )
    local = backend.generate(backend.encode_messages([{"role": "user", "content": prompt}]), max_new_tokens=10)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == local.text
    assert choice.finish_reason == local.finish_reason == "length"
    assert response.model == NAME and response.object == "chat.completion"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (local.prompt_tokens, 10)
    assert response.usage.total_tokens == local.prompt_tokens + 10


def test_stop_strings_end_the_answer(client, prompt):
    messages = [{"role": "user", "content": prompt}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10).choices[0].message.content
    stop = next(char for char in full[2:] if char.isascii() and char.isalnum())
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_completions_take_the_raw_prompt(client, backend):
    response = client.completions.create(model=NAME, prompt="start flow", max_tokens=5)
    local = backend.generate(backend.encode_text("start flow"), max_new_tokens=5)
    assert response.choices[0].text == local.text and response.usage.prompt_tokens == len(
        backend.encode_text("start flow")
    )
    default = client.completions.create(model=NAME, prompt="start flow")
    assert default.usage.completion_tokens == LIMITS.default_max_tokens


def test_models_health_and_the_key(client, base_url):
    assert [model.id for model in client.models.list()] == [NAME]
    root = base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json() == {"status": "ok", "model": NAME}  # no key needed
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    assert raised.value.body["code"] == "invalid_api_key"
    assert httpx.post(f"{base_url}/chat/completions", json={"messages": []}).status_code == 401


@pytest.mark.parametrize(
    ("request_options", "error", "param"),
    [
        ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
        ({"max_tokens": LIMITS.max_tokens + 1}, openai.BadRequestError, "max_tokens"),
        ({"temperature": 5}, openai.BadRequestError, "temperature"),
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"extra_body": {"structured_outputs": {"regex": "yes|no"}}}, openai.BadRequestError, "structured_outputs"),
        ({"extra_body": {"guided_regex": "yes|no"}}, openai.BadRequestError, "guided_regex"),
    ],
)
def test_bad_requests_get_structured_errors(client, request_options, error, param):
    options = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **request_options}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**options)
    assert raised.value.body["param"] == param and raised.value.body["message"]


def test_size_limits_and_malformed_bodies(client, base_url):
    headers = {"Authorization": f"Bearer {KEY}"}
    too_big = httpx.post(
        f"{base_url}/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "x" * LIMITS.max_request_bytes}]},
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "booking " * 3000}])
    assert raised.value.body["code"] == "context_length_exceeded"
    broken = httpx.post(f"{base_url}/chat/completions", headers=headers, content=b"{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    for body in ({"messages": "hi"}, {"messages": [{"role": "user"}]}, {"prompt": ["a", "b"]}):
        route = "completions" if "prompt" in body else "chat/completions"
        assert httpx.post(f"{base_url}/{route}", headers=headers, json=body).status_code == 400
    streaming = httpx.post(
        f"{base_url}/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert streaming.status_code == 400
    missing = httpx.get(f"{base_url}/embeddings", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_concurrent_requests_queue_and_overload_is_503(client, base_url, backend, model_server):
    results: list[str] = []

    def ask() -> None:
        response = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        results.append(response.choices[0].message.content)

    with backend._lock:  # hold the model: both requests wait in the queue
        threads = [threading.Thread(target=ask) for _ in range(LIMITS.max_pending)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while model_server._pending < LIMITS.max_pending and time.monotonic() < deadline:
            time.sleep(0.01)
        overloaded = httpx.post(
            f"{base_url}/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert httpx.get(f"{base_url.removesuffix('/v1')}/health").status_code == 200  # the loop stays free
    for thread in threads:
        thread.join(timeout=30)
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "1"
    assert overloaded.json()["error"]["code"] == "overloaded"
    assert len(results) == LIMITS.max_pending and len(set(results)) == 1  # same prompt, greedy: same answer


def test_runtime_api_through_the_server(project, base_url, finetuned, backend):
    info = read_training_info(finetuned)
    remote = OpenAIBackend(base_url, NAME, api_key=KEY, max_tokens=12)
    state = conversation_state(project, [("user", "hi"), ("bot", "Hello!")])
    served = CommandGenerator.for_model(project, remote, training_info=info).predict(state, "a car in Porto")
    local = CommandGenerator.for_model(project, backend).predict(state, "a car in Porto")
    assert served.prompt == local.prompt and served.raw_text == local.raw_text  # same model, same greedy answer
    assert not served.parseable  # an untrained model: garbage
    constrained = CommandGenerator.for_model(project, remote, training_info=info, constrained=True)
    for user_logged_in in (False, True):  # the grammar of each state: change_flight only when logged in
        state = conversation_state(
            project, [("user", "hi"), ("bot", "Hello!")], slots={"user_logged_in": user_logged_in}
        )
        prediction = constrained.predict(state, "a car in Porto")  # structured_outputs with the state's grammar
        assert prediction.parseable and prediction.commands and not prediction.dropped
        assert parse_model_output(prediction.raw_text, Syntax.V2).fully_parsed
        assert ("change_flight" in constrained.grammar(state).flows) is user_logged_in


def test_server_can_constrain_every_answer(backend, project):
    server = ModelServer(backend, NAME, LIMITS, project, Syntax.V2, always_constrain=True)
    with running_in_background(create_app(server)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=24)
    text = answer.choices[0].message.content
    assert build_grammar(project, Syntax.V2).matcher().fullmatch(text), text
    with pytest.raises(ConfigError, match="--project"):
        ModelServer(backend, NAME, LIMITS, None, always_constrain=True)
    without_project = ModelServer(backend, NAME, LIMITS)
    with running_in_background(create_app(without_project)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--project"):
            client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"structured_outputs": build_grammar(project, Syntax.V2).structured_outputs()},
            )


def test_exposed_host_without_key_is_warned_about(caplog):
    with caplog.at_level("WARNING"):
        check_exposure("127.0.0.1", None)
        assert not caplog.text
        check_exposure("0.0.0.0", None)
    assert "without an API key" in caplog.text


def test_cli_errors_before_loading_anything(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--constrained"]) == 2
    assert "--constrained needs --project" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--api-key-env", "RECIPE_TEST_UNSET_KEY"]) == 2
    assert "not set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- vLLM


def test_vllm_command_for_the_merged_model(finetuned):
    command = vllm_serve_command(finetuned, served_name=NAME)
    assert command[:3] == ["vllm", "serve", str((finetuned / "merged").resolve())]
    assert _option(command, "--served-model-name") == NAME and "--enable-lora" not in command
    # The longest training row (3000 tokens) plus a quarter, plus 256 answer tokens, rounded up to 1024s.
    assert _option(command, "--max-model-len") == "4096"
    assert _option(command, "--host") == "127.0.0.1" and _option(command, "--port") == "8000"


def test_vllm_command_for_the_adapter(finetuned):
    command = vllm_serve_command(finetuned, served_name=NAME, merged=False, max_model_len=6000, port=9000)
    base = str((finetuned.parent / "base").resolve())
    assert command[:4] == ["vllm", "serve", base, "--enable-lora"]
    assert _option(command, "--lora-modules") == f"{NAME}={finetuned.resolve()}"
    assert _option(command, "--max-lora-rank") == "8"  # r=4, rounded up to a rank vLLM supports
    assert _option(command, "--chat-template") == str((finetuned / "chat_template.jinja").resolve())
    assert _option(command, "--max-model-len") == "6000" and _option(command, "--port") == "9000"
    other = vllm_serve_command(
        finetuned, served_name=NAME, merged=False, base_model="meta-llama/Llama-3.1-8B-Instruct", max_lora_rank=64
    )
    assert other[2] == "meta-llama/Llama-3.1-8B-Instruct" and _option(other, "--max-lora-rank") == "64"


def test_vllm_command_errors(finetuned, tmp_path):
    (tmp_path / "adapter_only").mkdir()
    with pytest.raises(ConfigError, match="no merged model"):
        vllm_serve_command(tmp_path / "adapter_only", served_name=NAME, merged=True)
    with pytest.raises(ConfigError, match="adapter_config.json"):
        vllm_serve_command(tmp_path / "adapter_only", served_name=NAME)
    with pytest.raises(ConfigError, match="not found"):
        vllm_serve_command(tmp_path / "missing", served_name=NAME)


def test_cli_prints_the_vllm_command(finetuned, capsys):
    assert main(["serve", "--model", str(finetuned), "--print-vllm-command", "--vllm-adapter", "--name", NAME]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == vllm_serve_command(finetuned, served_name=NAME, merged=False)


def test_serve_help_shows_the_limits_defaults_and_what_max_model_len_means(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default: 512)", "(default: 256)", "(default: 8192)", "(default: 1000000)", "(default: 32)"]:
        assert default in text
    assert "max_model_len" in text and "--max-prompt-tokens + --max-tokens-limit" in text


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# ---------------------------------------------------------------------------------------------- rasa-config


def _blocks(text: str) -> tuple[dict, dict]:
    endpoints, config = text.split("# config.yml\n")
    yaml = YAML(typ="safe")
    return yaml.load(endpoints), yaml.load(config)


def test_rasa_config_points_the_assistant_at_the_served_model(finetuned, capsys, tmp_path):
    assert (
        main(["rasa-config", "--model", str(finetuned), "--model-name", NAME, "--api-base", "http://llm-host:8000/v1/"])
        == 0
    )
    text = capsys.readouterr().out
    endpoints, config = _blocks(text)
    group = endpoints["model_groups"][0]
    assert group["models"] == [
        {
            "provider": "self-hosted",
            "model": NAME,
            "api_base": "http://llm-host:8000/v1",
            "temperature": 0.0,
            "max_tokens": 256,
        }
    ]
    component = config["pipeline"][0]
    info = read_training_info(finetuned)
    assert component["name"] == "CompactLLMCommandGenerator" and component["llm"] == {"model_group": group["id"]}
    relative = "prompts/" + Path(info["prompt_template"]).name  # not a path on this machine
    assert component["prompt_template"] == relative and not Path(relative).is_absolute()
    assert f"# copy the template the model was trained with to {relative}" in text and "--write-template FILE" in text
    assert component["include_date_time"] is False and component["flow_retrieval"] == {"active": False}
    assert "provider: rasa" not in text and "WARNING" not in text

    written = tmp_path / "prompts" / "cmdgen.jinja2"
    assert (
        main(
            [
                "rasa-config",
                "--model",
                str(finetuned),
                "--model-name",
                NAME,
                "--api-base",
                "http://h:8000/v1",
                "--write-template",
                str(written),
                "--api-key-env",
                "CMDGEN_KEY",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    endpoints, config = _blocks(text)
    assert "WARNING" not in text and "copy" not in text
    assert written.read_text(encoding="utf-8") == info["prompt_template_text"]
    assert config["pipeline"][0]["prompt_template"] == str(written)
    assert endpoints["model_groups"][0]["models"][0]["api_key"] == "${CMDGEN_KEY}"
    other = tmp_path / "other.jinja2"
    other.write_text("{{ user_message }}", encoding="utf-8")
    assert (
        main(
            [
                "rasa-config",
                "--model",
                str(finetuned),
                "--model-name",
                NAME,
                "--api-base",
                "http://h:8000/v1",
                "--prompt-template",
                str(other),
            ]
        )
        == 0
    )
    assert "WARNING: " + str(other) + " is not the template the model was trained with" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("syntax", "generator"),
    [
        ("v1", "SingleStepLLMCommandGenerator"),
        ("v2", "CompactLLMCommandGenerator"),
        ("v3", "SearchReadyLLMCommandGenerator"),
    ],
)
def test_rasa_config_generator_follows_the_syntax(syntax, generator):
    info = {
        "command_syntax": syntax,
        "prompt_template": "prompts/p.jinja2",
        "include_date_time": True,
        "training": {"prompt_format": "raw"},
    }
    result = rasa_config(model_name=NAME, api_base="http://h/v1", training_info=info, prompt_template=None, syntax=None)
    component = result.config["pipeline"][0]
    assert component["name"] == generator and component["include_date_time"] is True
    assert result.endpoints["model_groups"][0]["models"][0]["use_chat_completions_endpoint"] is False


def test_rasa_config_mistakes(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--api-base"):
        rasa_config(model_name=NAME, api_base="llm-host:8000", training_info={}, prompt_template="p", syntax="v2")
    with pytest.raises(ConfigError, match="--command-syntax"):
        rasa_config(model_name=NAME, api_base="http://h/v1", training_info=None, prompt_template="p", syntax=None)
    assert main(["rasa-config", "--model", str(tmp_path), "--model-name", NAME, "--api-base", "http://h/v1"]) == 2
    assert "no recipe_training_info.json" in capsys.readouterr().err


def test_rasa_config_rejects_a_syntax_the_model_was_not_trained_with(finetuned, capsys):
    assert (
        main(
            [
                "rasa-config",
                "--model",
                str(finetuned),
                "--model-name",
                NAME,
                "--api-base",
                "http://h/v1",
                "--command-syntax",
                "v1",
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert not captured.out and "trained with v2" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert (
        main(
            [
                "rasa-config",
                "--model",
                str(finetuned),
                "--model-name",
                NAME,
                "--api-base",
                "http://h/v1",
                "--command-syntax",
                "v2",
            ]
        )
        == 0
    )
    assert "CompactLLMCommandGenerator" in capsys.readouterr().out


def test_rasa_config_help_shows_the_group_id_default(capsys):
    with pytest.raises(SystemExit):
        main(["rasa-config", "--help"])
    assert "default: finetuned_command_generator" in " ".join(capsys.readouterr().out.split())
