"""The LLM configs Rasa Pro accepts: `reasoning_effort`, `max_completion_tokens`, and every provider of its docs,
each called through the real client against a real server on 127.0.0.1 (OpenAI-compatible ones through
ScriptedOpenAIServer; Anthropic's messages API and Bedrock's Converse API through NativeLLMServer), with keys from
the environment variables Rasa reads."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac

import pytest

from recipe.errors import ConfigError
from recipe.llm import DEFAULT_KEY_ENV_VARS, LLMClient, LLMConfig
from recipe.providers import sigv4_headers
from recipe.testing.native_servers import NativeLLMServer
from recipe.testing.openai_server import Reply, ScriptedOpenAIServer

FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.02, "max_retry_after_s": 0.05}


def _ask(config: LLMConfig, environ: dict[str, str] | None = None, **options) -> tuple[str, LLMClient]:
    async def run() -> tuple[str, LLMClient]:
        client = LLMClient(config, cache_dir=None, environ=environ or {}, **{**FAST, **options})
        try:
            result = await client.chat([{"role": "user", "content": "Your action list:"}])
        finally:
            await client.aclose()
        return result.text, client

    return asyncio.run(run())


def test_reasoning_effort_and_max_completion_tokens_are_accepted_and_sent():
    with ScriptedOpenAIServer(lambda body: "start flow x") as server:
        config = LLMConfig.from_mapping(
            {
                "provider": "openai",
                "model": "gpt-5.1-2025-11-13",
                "api_base": server.base_url,
                "reasoning_effort": "low",
                "max_completion_tokens": 64,
            },
            source="t",
        )
        text, _ = _ask(config, {"OPENAI_API_KEY": "sk-test-0123456789"})
        body = server.requests[-1].body
    assert text == "start flow x" and body["reasoning_effort"] == "low" and body["max_completion_tokens"] == 64
    with pytest.raises(ConfigError, match="reasoning_effort.*one of none, minimal"):
        LLMConfig.from_mapping({"model": "m", "reasoning_effort": "extreme"}, source="t")


@pytest.mark.parametrize("provider", ["vllm", "hosted_vllm", "ollama", "self-hosted"])
def test_openai_compatible_servers(provider):
    with ScriptedOpenAIServer(lambda body: "cancel flow") as server:
        config = LLMConfig.from_mapping({"provider": provider, "model": "m", "api_base": server.base_url}, source="t")
        assert _ask(config)[0] == "cancel flow"  # no key needed for a local server
        keyed = _ask(config, {DEFAULT_KEY_ENV_VARS[provider][0]: "local-key-123456"})
        assert keyed[0] == "cancel flow"
        assert server.requests[-1].headers.get("authorization") == "Bearer local-key-123456"
    if provider != "ollama":
        with pytest.raises(ConfigError, match="needs 'api_base'"):
            LLMConfig.from_mapping({"provider": provider, "model": "m"}, source="t")


def test_anthropic_messages_api_with_its_key_thinking_and_retries():
    replies = iter([Reply.error(429, message="slow down", retry_after=0), Reply.text("start flow x")])
    with NativeLLMServer("anthropic", lambda body: next(replies), models=["claude-sonnet-4-6"]) as server:
        config = LLMConfig.from_mapping(
            {
                "provider": "anthropic",
                "model": "claude-sonnet-4-6",
                "api_base": server.root_url,
                "reasoning_effort": "low",
            },
            source="t",
        )
        text, client = _ask(config, {"ANTHROPIC_API_KEY": "sk-ant-test-0123456789"})
        requests = server.requests
    assert text == "start flow x" and client.usage.retries == 1
    last = requests[-1]
    assert last.path == "/v1/messages" and last.headers["x-api-key"] == "sk-ant-test-0123456789"
    assert last.headers["anthropic-version"] == "2023-06-01"
    assert last.body["messages"] == [{"role": "user", "content": "Your action list:"}]
    assert last.body["thinking"] == {"type": "enabled", "budget_tokens": 1024} and last.body["max_tokens"] > 1024
    assert "temperature" not in last.body  # extended thinking takes no temperature
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        _ask(config, {})


def test_bedrock_converse_api_signed_with_sigv4(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    with NativeLLMServer("bedrock", lambda body: "set slot city Lisbon") as server:
        for provider in ("bedrock", "aws_bedrock"):
            config = LLMConfig.from_mapping(
                {
                    "provider": provider,
                    "model": "anthropic.claude-sonnet-4-6",
                    "api_base": server.root_url,
                    "aws_region_name": "eu-west-1",
                    "max_completion_tokens": 32,
                },
                source="t",
            )
            text, _ = _ask(config, {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"})
            assert text == "set slot city Lisbon"
        request = server.requests[-1]
    assert request.path == "/model/anthropic.claude-sonnet-4-6/converse"
    assert request.body["messages"] == [{"role": "user", "content": [{"text": "Your action list:"}]}]
    assert request.body["inferenceConfig"]["maxTokens"] == 32
    authorization = request.headers["authorization"]
    assert (
        authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
        and "/eu-west-1/bedrock/aws4_request" in authorization
    )
    # the server recomputes the signature from what it received
    stamp = request.headers["x-amz-date"]
    expected = sigv4_headers(
        "POST",
        server.root_url + request.path,
        request.raw,
        region="eu-west-1",
        service="bedrock",
        access_key="AKIDEXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        now=dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC),
    )
    assert expected["authorization"] == authorization
    assert request.headers["x-amz-content-sha256"] == hashlib.sha256(request.raw).hexdigest()


def test_bedrock_bearer_key(monkeypatch):
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "bedrock-api-key-123456")
    with NativeLLMServer("bedrock", lambda body: "cancel flow") as server:
        config = LLMConfig.from_mapping({"provider": "bedrock", "model": "m", "api_base": server.root_url}, source="t")
        assert _ask(config, {"AWS_BEARER_TOKEN_BEDROCK": "bedrock-api-key-123456"})[0] == "cancel flow"
        assert server.requests[-1].headers["authorization"] == "Bearer bedrock-api-key-123456"


def test_sigv4_matches_the_published_algorithm():
    # A signature computed here step by step with hmac, independently of the helper's loop.
    now = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    body = b"{}"
    headers = sigv4_headers(
        "POST",
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse",
        body,
        region="us-east-1",
        service="bedrock",
        access_key="AK",
        secret_key="SECRET",
        now=now,
    )
    payload = hashlib.sha256(body).hexdigest()
    canonical = (
        "POST\n/model/m/converse\n\nhost:bedrock-runtime.us-east-1.amazonaws.com\n"
        f"x-amz-content-sha256:{payload}\nx-amz-date:20250102T030405Z\n\n"
        f"host;x-amz-content-sha256;x-amz-date\n{payload}"
    )
    to_sign = (
        "AWS4-HMAC-SHA256\n20250102T030405Z\n20250102/us-east-1/bedrock/aws4_request\n"
        + hashlib.sha256(canonical.encode()).hexdigest()
    )
    k_date = hmac.new(b"AWS4SECRET", b"20250102", hashlib.sha256).digest()
    k_region = hmac.new(k_date, b"us-east-1", hashlib.sha256).digest()
    k_service = hmac.new(k_region, b"bedrock", hashlib.sha256).digest()
    k_signing = hmac.new(k_service, b"aws4_request", hashlib.sha256).digest()
    signature = hmac.new(k_signing, to_sign.encode(), hashlib.sha256).hexdigest()
    assert headers["authorization"].endswith(f"Signature={signature}")
