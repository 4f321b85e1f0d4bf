"""The LLM layer through the real `openai` client against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from recipe.errors import ConfigError
from recipe.llm import LLMCallFailed, LLMClient, LLMConfig
from recipe.testing import FaultSchedule, Reply, ScriptedOpenAIServer

FAST_BACKOFF: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05}


def self_hosted(server: ScriptedOpenAIServer, *, timeout: float = 5.0, model: str = "test-model") -> LLMConfig:
    return LLMConfig(provider="self-hosted", model=model, api_base=server.base_url, timeout=timeout)


def make_client(config: LLMConfig, cache_dir: Path | None = None, **options: Any) -> LLMClient:
    return LLMClient(config, cache_dir=cache_dir, environ={}, **{**FAST_BACKOFF, **options})


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_plain_answer_is_parsed_and_counted() -> None:
    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            result = await client.chat(user("send 40 to Mia"))
            assert (result.text, result.finish_reason, result.cached) == ("start flow transfer_money", "stop", False)
            assert (result.prompt_tokens, result.completion_tokens) == (4, 3)
            assert client.usage.requests == client.usage.api_calls == 1
            assert client.usage_summary()["price_per_million_tokens"] == "unknown"
            assert client.estimated_cost_usd() == 0.0

    with ScriptedOpenAIServer(FaultSchedule("start flow transfer_money")) as server:
        asyncio.run(scenario(server))
        request = server.requests[0]
        assert request.endpoint == "chat" and request.body["model"] == "test-model"
        assert request.body["temperature"] == 0.0


def test_second_identical_call_is_a_cache_hit_and_sample_index_is_a_new_entry(tmp_path: Path) -> None:
    async def first_run(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server), tmp_path) as client:
            assert not (await client.chat(user("hi"))).cached
            again = await client.chat(user("hi"))
            assert again.cached and again.text == "echo: hi"
            assert server.hits() == 1
            assert not (await client.chat(user("hi"), sample_index=1)).cached
            assert not (await client.chat(user("hi"), temperature=0.7)).cached
            assert server.hits() == 3
            assert (client.usage.cache_hits, client.usage.api_calls) == (1, 3)

    async def second_run(server: ScriptedOpenAIServer) -> None:  # a resumed run reuses the cache on disk
        async with make_client(self_hosted(server), tmp_path) as client:
            assert (await client.chat(user("hi"), sample_index=1)).cached

    with ScriptedOpenAIServer() as server:
        asyncio.run(first_run(server))
        asyncio.run(second_run(server))
        assert server.hits() == 3


def test_429_waits_for_retry_after_then_succeeds() -> None:
    schedule = FaultSchedule("ok").fail_first(1, Reply.error(429, retry_after=1), prompt="busy")

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            started = time.monotonic()
            result = await client.chat(user("busy"))
            waited = time.monotonic() - started
            assert result.text == "ok"
            assert 0.9 <= waited < 5  # the header asked for 1 s; our own backoff would have been ~0.01 s
            assert client.usage.retries == 1

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        assert server.hits("busy") == 2


def test_retry_after_ms_is_honoured() -> None:
    schedule = FaultSchedule("ok").fail_first(1, Reply.error(503, retry_after_ms=300), prompt="busy")

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            started = time.monotonic()
            assert (await client.chat(user("busy"))).text == "ok"
            assert time.monotonic() - started >= 0.25

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))


def test_500_twice_then_success() -> None:
    schedule = FaultSchedule("ok").fail_first(2, Reply.error(500), prompt="flaky")

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            assert (await client.chat(user("flaky"))).text == "ok"
            assert (client.usage.retries, client.usage.api_calls, client.usage.failures) == (2, 3, 0)

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        assert server.hits("flaky") == 3


def test_timeout_is_retried() -> None:
    schedule = FaultSchedule("ok").script(Reply.delay(3, then="too late"), prompt="slow")

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server, timeout=0.3)) as client:
            started = time.monotonic()
            assert (await client.chat(user("slow"))).text == "ok"
            assert time.monotonic() - started < 2.5  # gave up on the slow answer instead of waiting for it

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        assert server.hits("slow") == 2


def test_malformed_body_and_dropped_connection_are_retried() -> None:
    schedule = (
        FaultSchedule("ok").script(Reply.malformed(), prompt="garbled").script(Reply.disconnect(), prompt="dropped")
    )

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            assert (await client.chat(user("garbled"))).text == "ok"
            assert (await client.chat(user("dropped"))).text == "ok"

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        assert server.hits("garbled") == server.hits("dropped") == 2


def test_401_is_not_retried() -> None:
    schedule = FaultSchedule("ok").fail_first(5, Reply.error(401, message="invalid api key"))

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            with pytest.raises(LLMCallFailed) as failure:
                await client.chat(user("hi"))
            assert (failure.value.attempts, failure.value.status_code) == (1, 401)
            assert failure.value.fails_every_call and "invalid api key" in failure.value.last_error
            assert (client.usage.retries, client.usage.failures) == (0, 1)

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        assert server.hits() == 1


def test_exhausted_retries_fail_one_call_and_the_others_still_succeed() -> None:
    schedule = FaultSchedule(lambda request: f"answer to {request['messages'][-1]['content']}")
    schedule.fail_first(10, Reply.error(500, message="model overloaded"), prompt="doomed")
    prompts = ["a", "b", "doomed", "c", "d"]

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server), max_retries=2) as client:
            results = await asyncio.gather(*(client.chat(user(p)) for p in prompts), return_exceptions=True)
            failure = results[2]
            assert isinstance(failure, LLMCallFailed)
            assert failure.attempts == 3 and failure.status_code == 500 and "model overloaded" in failure.last_error
            assert [r.text for r in results if not isinstance(r, Exception)] == [
                "answer to a",
                "answer to b",
                "answer to c",
                "answer to d",
            ]
            assert (client.usage.failures, client.usage.retries) == (1, 2)
            assert client.usage_summary()["failures"] == 1

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        assert server.hits("doomed") == 3


def test_concurrency_limit_is_respected() -> None:
    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server), max_concurrency=3) as client:
            results = await asyncio.gather(*(client.chat(user(f"q{i}")) for i in range(12)), return_exceptions=True)
            assert not [r for r in results if isinstance(r, Exception)]

    with ScriptedOpenAIServer(latency_s=0.1) as server:
        asyncio.run(scenario(server))
        assert server.hits() == 12
        assert 2 <= server.max_in_flight <= 3


def test_rejected_response_format_is_retried_without_it_and_remembered() -> None:
    json_mode = {"type": "json_object"}

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            assert (await client.chat(user("one"), response_format=json_mode)).text == "echo: one"
            assert (await client.chat(user("two"), response_format=json_mode)).text == "echo: two"

    with ScriptedOpenAIServer(reject_response_format=True) as server:
        asyncio.run(scenario(server))
        sent_formats = [request.body.get("response_format") for request in server.requests]
        assert sent_formats == [json_mode, None, None]  # "two" went straight out without it


def test_response_format_is_sent_when_supported() -> None:
    json_mode = {"type": "json_object"}

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            await client.chat(user("one"), response_format=json_mode)

    with ScriptedOpenAIServer() as server:
        asyncio.run(scenario(server))
        assert server.requests[0].body["response_format"] == json_mode


def test_truncated_answer_is_returned_with_its_finish_reason_and_completions_endpoint_works() -> None:
    schedule = FaultSchedule("start flow").script(Reply.text("start fl", finish_reason="length"), prompt="long")

    async def scenario(server: ScriptedOpenAIServer) -> None:
        async with make_client(self_hosted(server)) as client:
            truncated = await client.chat(user("long"), max_completion_tokens=2)
            assert (truncated.text, truncated.finish_reason) == ("start fl", "length")
            raw = await client.chat(user("<raw prompt>"), use_completions_endpoint=True)
            assert raw.text == "start flow"
            assert client.usage.truncated == 1

    with ScriptedOpenAIServer(schedule) as server:
        asyncio.run(scenario(server))
        chat, completion = server.requests
        assert chat.body["max_completion_tokens"] == 2
        assert completion.endpoint == "completions" and completion.body["prompt"] == "<raw prompt>"


def test_cache_files_are_written_atomically_and_a_corrupted_entry_is_a_miss(tmp_path: Path) -> None:
    async def ask(server: ScriptedOpenAIServer) -> bool:
        async with make_client(self_hosted(server), tmp_path) as client:
            return (await client.chat(user("hi"))).cached

    with ScriptedOpenAIServer() as server:
        assert asyncio.run(ask(server)) is False
        files = [path for path in tmp_path.rglob("*") if path.is_file()]
        assert len(files) == 1 and files[0].suffix == ".json"  # no temp files left behind
        entry_file = files[0]
        assert entry_file.parent.name == entry_file.stem[:2] and len(entry_file.stem) == 64
        assert json.loads(entry_file.read_text())["answer"]["text"] == "echo: hi"

        entry_file.write_text('{"key": "trunc')  # e.g. a disk filled up by another process
        assert asyncio.run(ask(server)) is False
        assert server.hits() == 2
        assert asyncio.run(ask(server)) is True  # the miss rewrote a good entry
        assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == [entry_file.name]


def test_azure_client_calls_the_deployment_route(tmp_path: Path) -> None:
    async def scenario(server: ScriptedOpenAIServer) -> None:
        config = LLMConfig(
            provider="azure", model="my-deployment", api_base=server.root_url, api_version="2024-10-21", timeout=5
        )
        client = LLMClient(config, cache_dir=None, environ={"AZURE_API_KEY": "secret"}, **FAST_BACKOFF)
        async with client:
            assert (await client.chat(user("hi"))).text == "echo: hi"

    with ScriptedOpenAIServer() as server:
        asyncio.run(scenario(server))
        request = server.requests[0]
        assert request.path.startswith("/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21")
        assert request.headers.get("api-key") == "secret"


def test_cost_estimate_uses_the_price_table() -> None:
    big_usage = FaultSchedule(lambda request: Reply.text("x", prompt_tokens=1_000_000, completion_tokens=100_000))

    async def scenario(server: ScriptedOpenAIServer) -> None:
        config = LLMConfig(provider="openai", model="gpt-4o-mini-2024-07-18", api_base=server.base_url)
        async with LLMClient(config, cache_dir=None, environ={"OPENAI_API_KEY": "k"}, **FAST_BACKOFF) as client:
            await client.chat(user("hi"))
            summary = client.usage_summary()
            assert summary["price_per_million_tokens"] == {"input": 0.15, "output": 0.60}
            assert summary["estimated_cost_usd"] == pytest.approx(0.15 + 0.06)

    with ScriptedOpenAIServer(big_usage) as server:
        asyncio.run(scenario(server))


def test_a_client_refuses_a_second_event_loop() -> None:
    with ScriptedOpenAIServer() as server:
        client = make_client(self_hosted(server))

        async def first_run() -> None:
            async with client:
                await client.chat(user("hi"))

        asyncio.run(first_run())
        with pytest.raises(RuntimeError, match="one client per"):
            asyncio.run(client.chat(user("hi")))


# -- config ----------------------------------------------------------------------------------------------------------


def one_line_config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as error:
        LLMConfig.from_mapping(data, source="rephrase.yml")
    message = str(error.value)
    assert "\n" not in message and message.startswith("rephrase.yml: ")
    return message


def test_config_errors_are_one_line_and_name_source_and_key() -> None:
    assert "'temprature'" in one_line_config_error({"model": "gpt-4o", "temprature": 0.2})
    assert "'api_version'" in one_line_config_error({"provider": "azure", "api_base": "https://x.openai.azure.com"})
    assert "'api_base'" in one_line_config_error({"provider": "self-hosted"})
    assert "api_key_env" in one_line_config_error({"api_key": "sk-123"})
    assert "'timeout'" in one_line_config_error({"timeout": "soon"})
    assert "'provider'" in one_line_config_error({"provider": "watsonx"})  # anthropic is a provider since issue 11
    assert "'max_completion_tokens'" in one_line_config_error({"max_completion_tokens": True})
    assert "model_name" in one_line_config_error({"model": "a", "model_name": "b"})


def test_config_accepts_model_name_alias_and_defaults() -> None:
    config = LLMConfig.from_mapping({"model_name": "gpt-4.1-mini", "timeout": 30}, source="x.yml")
    assert (config.provider, config.model, config.timeout, config.temperature) == ("openai", "gpt-4.1-mini", 30.0, 0.0)


def test_role_configs_read_top_level_or_llm_key(tmp_path: Path) -> None:
    from recipe.llm_roles import load_llm_role_config

    default = LLMConfig()
    nested = tmp_path / "rephrase.yml"
    nested.write_text(
        "prompt_template: p.jinja\nllm:\n  provider: self-hosted\n  model: qwen\n"
        "  api_base: http://localhost:8000/v1\n  temperature: 0.7\n"
    )
    assert load_llm_role_config(nested, tmp_path, default) == LLMConfig(
        provider="self-hosted", model="qwen", api_base="http://localhost:8000/v1", temperature=0.7
    )
    flat = tmp_path / "teacher.yml"
    flat.write_text("model: gpt-4o\nmax_completion_tokens: 256\n")
    assert load_llm_role_config(flat, tmp_path, default) == LLMConfig(model="gpt-4o", max_completion_tokens=256)

    broken = tmp_path / "broken.yml"
    broken.write_text("llm: [unclosed\n")
    from recipe.errors import InputError

    with pytest.raises(InputError, match="broken.yml:1: invalid YAML"):
        load_llm_role_config(broken, tmp_path, default)
    with pytest.raises(InputError, match="missing.yml: file not found"):
        load_llm_role_config(tmp_path / "missing.yml", tmp_path, default)


def test_api_keys_come_from_the_environment() -> None:
    assert LLMConfig().api_key({"OPENAI_API_KEY": "sk-1"}) == "sk-1"
    assert LLMConfig(api_key_env="MY_KEY").api_key({"MY_KEY": "sk-2", "OPENAI_API_KEY": "sk-1"}) == "sk-2"
    azure = LLMConfig(provider="azure", api_base="https://x", api_version="2024-10-21")
    assert azure.api_key({"AZURE_OPENAI_API_KEY": "az"}) == "az"
    assert LLMConfig(provider="self-hosted", api_base="http://h/v1").api_key({}) == "EMPTY"
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        LLMConfig().api_key({})
    with pytest.raises(ConfigError, match="MY_KEY"):
        LLMConfig(provider="self-hosted", api_base="http://h/v1", api_key_env="MY_KEY").api_key({})
