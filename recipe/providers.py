"""Clients for the LLM providers whose API is not OpenAI's, shaped like the `openai` SDK's async client.

Rasa Pro calls every provider through litellm. recipe keeps the `openai` SDK (it covers OpenAI, Azure and every
OpenAI-compatible server: vLLM, Ollama, self-hosted, TGI, LM Studio...) and adds here the two native APIs among the
providers Rasa documents that are not OpenAI-compatible: Anthropic's messages API and AWS Bedrock's Converse API.
Both speak plain HTTPS through httpx (already a dependency of the `openai` SDK), so no new dependency is needed.

The adapters expose what `recipe.llm.LLMClient` uses of the SDK client (`chat.completions.create`, `models.list`,
`with_options`, `close`) and raise the SDK's own exception classes, so retries, `Retry-After`, the cache and the
accounting work unchanged. Keys come from the environment variables Rasa (litellm) reads: `ANTHROPIC_API_KEY`;
`AWS_BEARER_TOKEN_BEDROCK`, else `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`) signed with
SigV4, region from `aws_region_name` or `AWS_REGION` / `AWS_DEFAULT_REGION`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import quote, urlsplit

import httpx
import openai

ANTHROPIC_API_BASE = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024  # the messages API requires max_tokens
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "endTurn": "stop",
    "stopSequence": "stop",
    "maxTokens": "length",
    "toolUse": "tool_calls",
}
# The SDK's exceptions are annotated with httpx2's Request/Response; they take httpx's (what is passed here) alike,
# hence the `cast(Any, ...)` around them.
_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}
# Anthropic's effort names for extended thinking, as budgets (Rasa passes `reasoning_effort` through litellm, which
# maps it the same way).
_THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}


def _completion(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> Any:
    """An object shaped like the SDK's ChatCompletion (what `recipe.llm._answer_from` reads)."""
    message = SimpleNamespace(content=text, role="assistant")
    choice = SimpleNamespace(message=message, finish_reason=finish_reason, index=0, text=text)
    usage = SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return SimpleNamespace(choices=[choice], usage=usage)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = (
        body.get("error", body).get("message", str(body))
        if isinstance(body, dict) and isinstance(body.get("error", body), dict)
        else (body.get("message") if isinstance(body, dict) else str(body))
    )
    error_class = _ERRORS.get(
        response.status_code, openai.InternalServerError if response.status_code >= 500 else openai.APIStatusError
    )
    raise error_class(f"Error code: {response.status_code} - {message}", response=cast(Any, response), body=body)


@dataclass
class _NativeClient:
    """What both adapters share: one httpx client, the timeout, the SDK-shaped namespaces."""

    api_base: str
    timeout: float
    _http: httpx.AsyncClient | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._chat))
        self.completions = SimpleNamespace(create=self._raw_completion)
        self.models = SimpleNamespace(list=self._models)

    def with_options(self, *, timeout: float | None = None, **_: Any) -> _NativeClient:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.timeout = timeout if timeout is not None else self.timeout
        clone.__post_init__()
        return clone

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient()
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _send(self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None = None) -> Any:
        request = self._client().build_request(method, url, headers=dict(headers), content=body, timeout=self.timeout)
        try:
            response = await self._client().send(request)
        except httpx.TimeoutException:
            raise openai.APITimeoutError(request=cast(Any, request)) from None
        except httpx.HTTPError as error:
            raise openai.APIConnectionError(
                message=str(error) or type(error).__name__, request=cast(Any, request)
            ) from None
        _raise_for(response)
        try:
            return response.json()
        except ValueError as error:
            raise openai.APIResponseValidationError(
                response=cast(Any, response),
                body=response.text,
                message=f"not JSON: {error}",
            ) from None

    async def _raw_completion(self, **_: Any) -> Any:
        raise openai.BadRequestError(
            "this provider has no /completions endpoint; use chat completions",
            response=cast(Any, httpx.Response(400, request=httpx.Request("POST", self.api_base))),
            body=None,
        )

    async def _chat(  # pragma: no cover - overridden
        self, *, messages: list[dict[str, Any]], model: str, **_: Any
    ) -> Any:
        raise NotImplementedError

    async def _models(self) -> Any:
        raise openai.NotFoundError(
            "no model list",
            response=cast(Any, httpx.Response(404, request=httpx.Request("GET", self.api_base))),
            body=None,
        )


def _system_and_turns(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    system = "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "system") or None
    return system, [m for m in messages if m.get("role") != "system"]


@dataclass
class AnthropicClient(_NativeClient):
    """Anthropic's messages API (`POST /v1/messages`)."""

    api_key: str = ""
    reasoning_effort: str | None = None

    async def _chat(
        self,
        *,
        messages: list[dict[str, Any]],
        model: str,
        temperature: float | None = None,
        max_completion_tokens: int | None = None,
        **_: Any,
    ) -> Any:
        system, turns = _system_and_turns(messages)
        payload: dict[str, Any] = {
            "model": model,
            "max_tokens": max_completion_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS,
            "messages": [{"role": m["role"], "content": m["content"]} for m in turns],
        }
        if system:
            payload["system"] = system
        if self.reasoning_effort in _THINKING_BUDGETS:
            budget = _THINKING_BUDGETS[self.reasoning_effort]
            payload["thinking"] = {"type": "enabled", "budget_tokens": budget}
            payload["max_tokens"] = max(payload["max_tokens"], budget + 1)  # thinking needs a budget below it
        elif temperature is not None:
            payload["temperature"] = temperature
        headers = {
            "x-api-key": self.api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
        }
        data = await self._send(
            "POST", f"{self.api_base.rstrip('/')}/v1/messages", headers=headers, body=json.dumps(payload).encode()
        )
        text = "".join(block.get("text", "") for block in data.get("content") or [] if block.get("type") == "text")
        usage = data.get("usage") or {}
        return _completion(
            text,
            _STOP_REASONS.get(data.get("stop_reason"), str(data.get("stop_reason"))),
            int(usage.get("input_tokens") or 0),
            int(usage.get("output_tokens") or 0),
        )

    async def _models(self) -> Any:
        headers = {"x-api-key": self.api_key, "anthropic-version": ANTHROPIC_VERSION}
        data = await self._send("GET", f"{self.api_base.rstrip('/')}/v1/models", headers=headers)
        return SimpleNamespace(data=[SimpleNamespace(id=m.get("id")) for m in data.get("data") or []])


@dataclass
class BedrockClient(_NativeClient):
    """AWS Bedrock's Converse API (`POST /model/<model id>/converse`), with a bearer key or SigV4."""

    region: str = "us-east-1"
    bearer_token: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    reasoning_effort: str | None = None

    async def _chat(
        self,
        *,
        messages: list[dict[str, Any]],
        model: str,
        temperature: float | None = None,
        max_completion_tokens: int | None = None,
        **_: Any,
    ) -> Any:
        system, turns = _system_and_turns(messages)
        payload: dict[str, Any] = {
            "messages": [{"role": m["role"], "content": [{"text": str(m["content"])}]} for m in turns]
        }
        if system:
            payload["system"] = [{"text": system}]
        inference: dict[str, Any] = {}
        if max_completion_tokens:
            inference["maxTokens"] = max_completion_tokens
        if temperature is not None:
            inference["temperature"] = temperature
        if inference:
            payload["inferenceConfig"] = inference
        url = f"{self.api_base.rstrip('/')}/model/{quote(model, safe='')}/converse"
        body = json.dumps(payload).encode()
        data = await self._send("POST", url, headers=self._auth_headers("POST", url, body), body=body)
        content = ((data.get("output") or {}).get("message") or {}).get("content") or []
        usage = data.get("usage") or {}
        return _completion(
            "".join(block.get("text", "") for block in content),
            _STOP_REASONS.get(data.get("stopReason"), str(data.get("stopReason"))),
            int(usage.get("inputTokens") or 0),
            int(usage.get("outputTokens") or 0),
        )

    def _auth_headers(self, method: str, url: str, body: bytes, now: dt.datetime | None = None) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.bearer_token:
            return {**headers, "authorization": f"Bearer {self.bearer_token}"}
        return {
            **headers,
            **sigv4_headers(
                method,
                url,
                body,
                region=self.region,
                service="bedrock",
                access_key=self.access_key or "",
                secret_key=self.secret_key or "",
                session_token=self.session_token,
                now=now,
            ),
        }


def sigv4_headers(
    method: str,
    url: str,
    body: bytes,
    *,
    region: str,
    service: str,
    access_key: str,
    secret_key: str,
    session_token: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """AWS Signature Version 4 headers for one request (the published algorithm; host, x-amz-date, content hash)."""
    now = now or dt.datetime.now(dt.UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    parts = urlsplit(url)
    payload_hash = hashlib.sha256(body).hexdigest()
    signed = {"host": parts.netloc, "x-amz-date": stamp, "x-amz-content-sha256": payload_hash}
    if session_token:
        signed["x-amz-security-token"] = session_token
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            quote(parts.path or "/", safe="/-_.~"),
            parts.query,
            "".join(f"{name}:{signed[name].strip()}\n" for name in names),
            ";".join(names),
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return {**{name: signed[name] for name in names if name != "host"}, "authorization": authorization}
