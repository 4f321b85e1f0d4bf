"""The LLM execution layer: config, a retrying and caching async client, usage accounting.

Used by `recipe prepare-data` (rephrasing, teacher annotation, oracle validation) and `recipe evaluate`. Design
points, each answering a weakness of Rasa Pro's tool (one call at a time, no cache, no retries):

* Provider errors are retried with exponential backoff and jitter, honouring `Retry-After`; only after the last retry
  does a call raise `LLMCallFailed`, which callers record before moving on (one error never drops other work).
* Answers are cached on disk by the sha256 of everything that determines them, so reruns and resumed runs are free.
* Calls run concurrently, bounded by a semaphore, all inside the one event loop of the run: an `LLMClient` refuses
  to be used from a second loop, because the HTTP connections it pools belong to the first.

    config = LLMConfig.from_mapping({"provider": "openai", "model": "gpt-4o-mini"}, source="example")
    async with LLMClient(config, cache_dir=run_dir / "llm_cache", max_concurrency=16) as client:
        result = await client.chat([{"role": "user", "content": prompt}])
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from recipe.cache import JsonCache
from recipe.errors import ConfigError

if TYPE_CHECKING:  # imported on first use: the offline path never needs it
    import openai

log = logging.getLogger(__name__)

Provider = Literal[
    "openai", "azure", "self-hosted", "vllm", "hosted_vllm", "ollama", "anthropic", "bedrock", "aws_bedrock"
]
# The providers of Rasa Pro's docs. OpenAI-compatible ones go through the `openai` SDK; Anthropic and Bedrock through
# their native APIs (recipe/providers.py). `aws_bedrock` and `hosted_vllm` are accepted spellings of `bedrock`, `vllm`.
PROVIDERS: tuple[str, ...] = (
    "openai",
    "azure",
    "self-hosted",
    "vllm",
    "hosted_vllm",
    "ollama",
    "anthropic",
    "bedrock",
    "aws_bedrock",
)
OPENAI_COMPATIBLE_PROVIDERS = frozenset({"openai", "azure", "self-hosted", "vllm", "hosted_vllm", "ollama"})
NO_KEY_PROVIDERS = frozenset({"self-hosted", "vllm", "hosted_vllm", "ollama"})  # local servers: a key is optional
OLLAMA_API_BASE = "http://localhost:11434/v1"
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")

# Environment variables searched for the key when the config names none (`api_key_env`), in order: the ones Rasa
# (litellm) reads for the provider.
DEFAULT_KEY_ENV_VARS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "azure": ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY"),
    "self-hosted": ("SELF_HOSTED_API_KEY", "HOSTED_VLLM_API_KEY"),
    "vllm": ("HOSTED_VLLM_API_KEY", "SELF_HOSTED_API_KEY"),
    "hosted_vllm": ("HOSTED_VLLM_API_KEY", "SELF_HOSTED_API_KEY"),
    "ollama": ("OLLAMA_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "bedrock": ("AWS_BEARER_TOKEN_BEDROCK", "AWS_SECRET_ACCESS_KEY"),
    "aws_bedrock": ("AWS_BEARER_TOKEN_BEDROCK", "AWS_SECRET_ACCESS_KEY"),
}
SELF_HOSTED_DUMMY_KEY = "EMPTY"  # vLLM and friends accept any key unless started with --api-key

# USD per 1M tokens (input, output): OpenAI list prices when this was written. An estimate only; check your invoice.
PRICES_PER_MILLION_TOKENS: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
}

RETRYABLE_STATUS_CODES = frozenset({408, 409, 429})  # plus every 5xx
# Failed calls in a row (each after its retries) after which a client stops calling its endpoint: the rest of the
# run goes on without that role instead of paying for, and waiting on, calls that will fail the same way.
MAX_CONSECUTIVE_FAILURES = 20
TRUNCATED_RETRIES = 1  # a cut answer is asked again once only: at a low temperature it is cut the same way again


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call a model. The API key never lives here: it comes from an environment variable."""

    provider: Provider = "openai"
    model: str = "gpt-4o-mini"
    api_base: str | None = None
    api_version: str | None = None
    timeout: float = 60.0
    temperature: float = 0.0
    max_completion_tokens: int | None = None
    api_key_env: str | None = None
    reasoning_effort: str | None = None  # sent as is (OpenAI-compatible) or as a thinking budget (Anthropic)
    aws_region_name: str | None = None  # Bedrock; else AWS_REGION / AWS_DEFAULT_REGION

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str) -> LLMConfig:
        """Validate a config mapping (e.g. the `llm:` block of a YAML file); errors are one-line `ConfigError`s."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: llm config must be a mapping, got {type(data).__name__}")
        values = dict(data)
        if "api_key" in values:
            raise ConfigError(
                f"{source}: 'api_key' is not accepted in a config file; put the key in an environment "
                f"variable (OPENAI_API_KEY, AZURE_API_KEY, SELF_HOSTED_API_KEY) or name one with "
                f"'api_key_env'"
            )
        if "model_name" in values:
            if "model" in values:
                raise ConfigError(f"{source}: give either 'model' or 'model_name', not both")
            values["model"] = values.pop("model_name")
        allowed = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in allowed:
                raise ConfigError(
                    f"{source}: unknown llm config key {key!r} (allowed: {', '.join(allowed)}, model_name)"
                )
        config = cls(**{key: _checked_value(key, value, source) for key, value in values.items()})
        config._check_provider_needs(source)
        return config

    def _check_provider_needs(self, source: str) -> None:
        if self.provider == "azure":
            for key in ("api_base", "api_version"):
                if getattr(self, key) is None:
                    raise ConfigError(f"{source}: provider 'azure' needs {key!r}")
        if self.provider in ("self-hosted", "vllm", "hosted_vllm") and self.api_base is None:
            raise ConfigError(f"{source}: provider {self.provider!r} needs 'api_base' (e.g. http://localhost:8000/v1)")

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key from the environment; a `ConfigError` when a provider that needs one has none."""
        names = (self.api_key_env,) if self.api_key_env else DEFAULT_KEY_ENV_VARS[self.provider]
        key = key_from_environment(names, environ, keyless=self.provider in NO_KEY_PROVIDERS and not self.api_key_env)
        if key is None:
            raise ConfigError(f"no API key for provider {self.provider!r}: set {' or '.join(names)}")
        return key


def key_from_environment(
    names: Sequence[str], environ: Mapping[str, str] | None = None, *, keyless: bool = False
) -> str | None:
    """The first of `names` set in the environment; for an endpoint that needs no key (`keyless`), a dummy one
    (the SDK refuses an empty key); None when a key is needed and none is set."""
    environ = os.environ if environ is None else environ
    for name in names:
        if environ.get(name):
            return environ[name]
    return SELF_HOSTED_DUMMY_KEY if keyless else None


def is_loopback(host: str) -> bool:
    """This machine only: where a server needs no key and an endpoint is sent none by default."""
    host = host.lower().strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def key_from_named_variable(variable: str, flag: str = "--api-key-env") -> str:
    """The key in the environment variable a user named (`--api-key-env VAR`); an error when it is not set."""
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(f"{flag} {variable}: the variable is not set")
    return key


def _checked_value(key: str, value: Any, source: str) -> Any:
    """Check one config value's type and range; returns it normalised (ints become floats where floats are meant)."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: llm config key {key!r} must be {expected}, got {value!r}")

    def is_number(candidate: object) -> bool:
        return isinstance(candidate, (int, float)) and not isinstance(candidate, bool)

    if key == "provider":
        if value not in PROVIDERS:
            raise fail(f"one of {', '.join(PROVIDERS)}")
        return value
    if key == "model":
        if not isinstance(value, str) or not value.strip():
            raise fail("a non-empty string")
        return value
    if key == "reasoning_effort":
        if value is not None and value not in REASONING_EFFORTS:
            raise fail(f"one of {', '.join(REASONING_EFFORTS)}")
        return value
    if key in ("api_base", "api_version", "api_key_env", "aws_region_name"):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise fail("a non-empty string")
        return value
    if key == "timeout":
        if not is_number(value) or value <= 0:
            raise fail("a positive number of seconds")
        return float(value)
    if key == "temperature":
        if not is_number(value) or not 0 <= value <= 2:
            raise fail("a number between 0 and 2")
        return float(value)
    if key == "max_completion_tokens":
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise fail("a positive integer")
        return value
    raise AssertionError(f"unchecked config key {key}")


# ---------------------------------------------------------------------------------------------------------------------
# Results, errors, usage


@dataclass(frozen=True)
class LLMResult:
    text: str
    finish_reason: str | None  # "length" means truncated: the caller decides what to do with it
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    latency_s: float  # time spent in this `chat` call (retries and waits included); tiny for a cache hit


class LLMCallFailed(Exception):
    """A call that did not succeed: retries exhausted, or an error that retrying cannot fix (400/401/403/404)."""

    def __init__(
        self, last_error: str, *, attempts: int, status_code: int | None = None, endpoint: str = "", sent: bool = True
    ):
        self.last_error = last_error
        self.attempts = attempts
        self.status_code = status_code
        self.sent = sent  # False: refused before sending, because the endpoint was marked down
        self.endpoint = endpoint  # "<role>: <provider> <model> at <api_base>", for messages that must name it
        super().__init__(f"LLM call failed after {attempts} attempt(s): {last_error}")

    @property
    def fails_every_call(self) -> bool:
        """Bad key, no permission or unknown model/route: every other call will fail the same way, so stop early."""
        return self.status_code in (401, 403, 404)


@dataclass
class LLMUsage:
    requests: int = 0  # `chat` calls
    cache_hits: int = 0
    api_calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    failures: int = 0  # `chat` calls that raised LLMCallFailed (not_sent included)
    truncated: int = 0  # answers with finish_reason "length"
    empty_answers: int = 0  # answers with no text (refused as incomplete where the client is told so)
    not_sent: int = 0  # calls refused without sending because the endpoint was marked down
    prompt_tokens: int = 0  # tokens of answers fetched in this run (cache hits cost nothing)
    completion_tokens: int = 0


def price_per_million_tokens(config: LLMConfig) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for OpenAI models, by the longest matching name; None when unknown."""
    if config.provider not in ("openai", "azure"):
        return None
    matches = [
        name for name in PRICES_PER_MILLION_TOKENS if config.model == name or config.model.startswith(name + "-")
    ]
    return PRICES_PER_MILLION_TOKENS[max(matches, key=len)] if matches else None


# ---------------------------------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class RetryPolicy:
    """Which failed calls to an OpenAI-compatible endpoint are asked again, how often, and how long to wait first.

    Shared by `LLMClient`, `recipe.embeddings.EmbeddingsClient` and `recipe.backends.OpenAIBackend`, which differ in
    the numbers only (the backend's are `recipe.backends.ENDPOINT_RETRY`). Retried: timeouts and dropped connections, HTTP 408, 409, 429 and every 5xx,
    broken bodies; never a 400, 401, 403 or 404 (asking again gets the same answer). The wait before retry n
    (0-based) is `min(backoff_cap_s, backoff_base_s * 2**n)` plus up to `backoff_base_s` of jitter, unless the server
    says how long (`Retry-After`, `retry-after-ms`; capped at `max_retry_after_s`).
    """

    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {self.max_retries}")

    def retryable(self, error: Exception) -> bool:
        return _is_retryable(error)

    def delay(self, error: Exception, *, retry_number: int, jitter: random.Random) -> float:
        """Seconds to wait before retry `retry_number` (0-based) after `error`."""
        response = getattr(error, "response", None)
        server_says = _retry_after_seconds(response.headers) if response is not None else None
        if server_says is not None:
            return min(server_says, self.max_retry_after_s)
        backoff = min(self.backoff_cap_s, self.backoff_base_s * 2**retry_number)
        return backoff + jitter.uniform(0, self.backoff_base_s)


# ---------------------------------------------------------------------------------------------------------------------
# Cache


class ResponseCache(JsonCache):
    """LLM answers on disk (see `JsonCache`): text and token counts."""

    kind = "LLM cache"

    def check_answer(self, answer: Any) -> None:
        if not (
            isinstance(answer["text"], str)
            and isinstance(answer["prompt_tokens"], int)
            and isinstance(answer["completion_tokens"], int)
        ):
            raise TypeError("bad field types")


def request_key(request: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines an answer."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Client


class _MalformedAnswer(Exception):
    """The server answered 200 with something that is not a usable completion."""


class _IncompleteAnswer(_MalformedAnswer):
    """An empty answer, or one cut at the token limit, from a client that must not accept those."""


@dataclass(frozen=True)
class _Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class LLMClient:
    """Calls one model with bounded concurrency, retries, an on-disk cache and usage accounting.

    Create it, use it and close it inside one event loop (one `asyncio.run` per run). Failed calls are retried as
    `RetryPolicy` says, with `max_retries`, `backoff_base_s`, `backoff_cap_s` and `max_retry_after_s` as given.

    With `refuse_incomplete`, an empty answer or one cut at the token limit is retried, counted, never cached, and
    in the end a failure naming the limit to raise (data generation needs whole answers; `evaluate` scores them).
    After `max_consecutive_failures` failed calls in a row (or as many calls' worth of failed attempts, since
    concurrent calls interleave their retries), or one 401/403/404, the client is `down`: later calls and retries
    fail at once without being sent. Error texts never carry the API key (`redact`).
    """

    def __init__(
        self,
        config: LLMConfig,
        *,
        cache_dir: str | Path | None,
        max_concurrency: int = 8,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        max_retry_after_s: float = 60.0,
        seed: int | None = None,
        environ: Mapping[str, str] | None = None,
        role: str = "llm",
        refuse_incomplete: bool = False,
        max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
        in_flight: dict[str, asyncio.Future] | None = None,
    ):
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.retry = RetryPolicy(max_retries, backoff_base_s, backoff_cap_s, max_retry_after_s)
        self.config = config
        self.cache = ResponseCache(Path(cache_dir)) if cache_dir is not None else None
        self.usage = LLMUsage()
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._jitter = random.Random(seed)
        self._response_format_supported = True  # set to False the first time the endpoint rejects JSON mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self.role = role
        self.refuse_incomplete = refuse_incomplete
        self.max_consecutive_failures = max_consecutive_failures
        self.down: str | None = None  # why the client stopped calling its endpoint; None while it calls
        self._consecutive_failures = 0
        self._failed_attempts_in_a_row = 0  # calls interleave their retries: this trips long before calls end
        # request key -> the answer of the identical call now in flight; clients sharing a cache may share it too,
        # so a request asked twice at once is paid once (the second waits, and counts as a cache hit)
        self._in_flight: dict[str, asyncio.Future] = {} if in_flight is None else in_flight
        api_key = config.api_key(environ)
        self._secret_patterns = _secret_patterns(api_key)
        self._sdk = _make_sdk_client(config, api_key)

    @property
    def endpoint(self) -> str:
        """`<role>: <provider> <model> at <api_base>`: what a message about this client's calls names."""
        return f"the {self.role} ({self.config.provider} {self.config.model} at {self.config.api_base or 'the default endpoint'})"

    def redact(self, text: str) -> str:
        """`text` with anything that looks like the configured API key replaced (servers echo keys in errors)."""
        for pattern in self._secret_patterns:
            text = pattern.sub("[redacted]", text)
        return text

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._sdk.close()

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        sample_index: int = 0,
        response_format: dict[str, Any] | None = None,
        temperature: float | None = None,
        max_completion_tokens: int | None = None,
        use_completions_endpoint: bool = False,
    ) -> LLMResult:
        """One answer for `messages`, from the cache or the model; raises `LLMCallFailed` when it cannot get one.

        `sample_index` makes several samples of the same prompt distinct cache entries. With
        `use_completions_endpoint` the single message's content is sent as the raw prompt to `/completions`.
        """
        self._check_event_loop()
        started = time.monotonic()
        self.usage.requests += 1
        request = self._request_description(
            messages,
            sample_index=sample_index,
            response_format=response_format,
            temperature=temperature,
            max_completion_tokens=max_completion_tokens,
            use_completions_endpoint=use_completions_endpoint,
        )
        key = request_key(request)
        stored = self.cache.get(key) if self.cache is not None else None
        if stored is not None and self.refuse_incomplete and _incomplete(stored["text"], stored.get("finish_reason")):
            stored = None  # written by an older version or another caller: ask again rather than train on it
        if stored is not None:
            self.usage.cache_hits += 1
            return LLMResult(
                text=stored["text"],
                finish_reason=stored.get("finish_reason"),
                prompt_tokens=stored["prompt_tokens"],
                completion_tokens=stored["completion_tokens"],
                cached=True,
                latency_s=time.monotonic() - started,
            )
        shared = self._in_flight.get(key)
        if shared is not None:
            # shield: a cancelled waiter must not cancel the call it waits on; None: that call failed or was
            # cancelled, so this one asks on its own (with its own retries and accounting)
            leader = await asyncio.shield(shared)
            if leader is not None:
                self.usage.cache_hits += 1
                return dataclasses.replace(leader, cached=True, latency_s=time.monotonic() - started)
        shared = asyncio.get_running_loop().create_future()
        self._in_flight[key] = shared
        try:
            result = await self._fetch(key, request, started)
            shared.set_result(result)
            return result
        finally:
            if not shared.done():
                shared.set_result(None)
            if self._in_flight.get(key) is shared:
                del self._in_flight[key]

    async def _fetch(self, key: str, request: dict[str, Any], started: float) -> LLMResult:
        """The answer from the model (retried), accounted for and cached."""
        try:
            answer = await self._call_with_retries(request)
        except LLMCallFailed as error:
            self.usage.failures += 1
            if not error.sent:
                self.usage.not_sent += 1
                raise
            self._consecutive_failures += 1
            if self.down is None and (
                error.fails_every_call or self._consecutive_failures >= self.max_consecutive_failures
            ):
                self.down = (
                    f"{self._consecutive_failures} call(s) in a row failed, the last with {error.last_error}"
                    if not error.fails_every_call
                    else error.last_error
                )
                log.error("%s is down and is no longer called: %s", self.endpoint, self.down)
            raise
        self._consecutive_failures = 0
        self.usage.prompt_tokens += answer.prompt_tokens
        self.usage.completion_tokens += answer.completion_tokens
        self.usage.truncated += answer.finish_reason == "length"
        if self.cache is not None:
            try:
                self.cache.put(key, request, dataclasses.asdict(answer))
            except OSError as error:  # a full or read-only disk must not lose an answer we already paid for
                log.warning("could not write LLM cache entry %s: %s", key, error)
        return LLMResult(
            text=answer.text,
            finish_reason=answer.finish_reason,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            cached=False,
            latency_s=time.monotonic() - started,
        )

    def _check_event_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                "an LLMClient is bound to the event loop it was first used in; create one client per asyncio.run"
            )

    def _request_description(
        self,
        messages: list[dict[str, Any]],
        *,
        sample_index: int,
        response_format: dict[str, Any] | None,
        temperature: float | None,
        max_completion_tokens: int | None,
        use_completions_endpoint: bool,
    ) -> dict[str, Any]:
        """Everything that determines the answer: the cache key material, and what `_send_once` sends."""
        if use_completions_endpoint and len(messages) != 1:
            raise ValueError("use_completions_endpoint needs exactly one message (its content is the raw prompt)")
        # Not the api_base: the same model behind another host or port gives the same answers and must not pay again.
        return {
            "provider": self.config.provider,
            "api_version": self.config.api_version,
            "model": self.config.model,
            "endpoint": "completions" if use_completions_endpoint else "chat",
            "temperature": self.config.temperature if temperature is None else temperature,
            "max_completion_tokens": max_completion_tokens or self.config.max_completion_tokens,
            "response_format": response_format,
            "messages": messages,
            "sample_index": sample_index,
            # only when set, so the cache keys of configs without it stay what they were
            **({"reasoning_effort": self.config.reasoning_effort} if self.config.reasoning_effort else {}),
        }

    async def _call_with_retries(self, request: dict[str, Any]) -> _Answer:
        import openai  # imported on first use: the offline path never needs it

        attempts = 0
        retries_left = self.retry.max_retries
        truncated_retries_left = TRUNCATED_RETRIES
        while True:
            attempts += 1
            send_response_format = self._response_format_supported and request["response_format"] is not None
            try:
                async with self._semaphore:
                    if self.down is not None:  # checked once a slot is free: calls queued behind are not sent
                        raise LLMCallFailed(
                            f"not sent: {self.down}", attempts=attempts - 1, endpoint=self.endpoint, sent=False
                        )
                    self.usage.api_calls += 1
                    answer = await self._send_once(request, send_response_format=send_response_format)
                if self.refuse_incomplete and _incomplete(answer.text, answer.finish_reason):
                    cut = answer.finish_reason == "length"
                    self.usage.truncated += cut
                    self.usage.empty_answers += not cut and not answer.text.strip()
                    if cut and truncated_retries_left == 0:
                        retries_left = 0
                    truncated_retries_left -= cut
                    raise _IncompleteAnswer(self._incomplete_message(request, answer))
                self._failed_attempts_in_a_row = 0
                return answer
            except openai.BadRequestError as error:
                if send_response_format and _mentions_json_mode(error):
                    # The endpoint has no JSON mode: ask again without it, and never send it again from this client.
                    log.warning("endpoint rejected response_format; retrying without it: %s", self._describe(error))
                    self._response_format_supported = False
                    self.usage.retries += 1
                    continue
                raise LLMCallFailed(
                    self._describe(error), attempts=attempts, status_code=error.status_code, endpoint=self.endpoint
                ) from error
            except (openai.OpenAIError, json.JSONDecodeError, _MalformedAnswer) as error:
                status_code = getattr(error, "status_code", None)
                self._failed_attempts_in_a_row += 1
                if self.down is None and self._failed_attempts_in_a_row >= self.max_consecutive_failures * (
                    self.retry.max_retries + 1
                ):
                    self.down = (
                        f"{self._failed_attempts_in_a_row} attempts in a row failed, the last with "
                        f"{self._describe(error)}"
                    )
                    log.error("%s is down and is no longer called: %s", self.endpoint, self.down)
                if not self.retry.retryable(error) or retries_left == 0:
                    raise LLMCallFailed(
                        self._describe(error), attempts=attempts, status_code=status_code, endpoint=self.endpoint
                    ) from error
                delay = self.retry.delay(error, retry_number=self.retry.max_retries - retries_left, jitter=self._jitter)
                log.info("LLM call failed (%s); retry in %.2fs", self._describe(error), delay)
                retries_left -= 1
                self.usage.retries += 1
                await asyncio.sleep(delay)

    def _incomplete_message(self, request: Mapping[str, Any], answer: _Answer) -> str:
        if answer.finish_reason == "length":
            limit = request["max_completion_tokens"]
            return (
                f"answer cut at the token limit (finish_reason length after {answer.completion_tokens} tokens, "
                f"max_completion_tokens {limit if limit is not None else 'the server default'}): raise "
                f"max_completion_tokens in the {self.role}'s LLM config"
            )
        return f"empty answer (no text; finish_reason {answer.finish_reason})"

    def _describe(self, error: Exception) -> str:
        return self.redact(_describe(error))

    async def check_endpoint(self, timeout_s: float = 10.0) -> str | None:
        """One cheap, unpaid call (the model list) before any work: why every call would fail (bad key, unknown model,
        endpoint unreachable), in a few words, else None. Inconclusive answers (no model list, 5xx) pass:
        the run itself then stops at the first 401/403/404."""
        import openai  # imported on first use: the offline path never needs it

        try:
            listing = await self._sdk.with_options(timeout=min(timeout_s, self.config.timeout)).models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            key_from = self.config.api_key_env or " or ".join(DEFAULT_KEY_ENV_VARS[self.config.provider])
            return f"{self._describe(error)}; check the API key ({key_from})"
        except openai.APIConnectionError as error:
            return f"cannot be reached ({self._describe(error)}); check api_base and the network"
        except (openai.OpenAIError, ValueError) as error:  # no /models route, a 5xx, a body we cannot read
            log.info("%s: model list not available (%s); not checked", self.endpoint, self._describe(error))
            return None
        ids = [getattr(model, "id", None) for model in getattr(listing, "data", None) or []]
        served: list[str] = [name for name in ids if isinstance(name, str)]
        # Azure lists base models, not the deployment names its config gives as `model`.
        if self.config.provider != "azure" and served and self.config.model not in served:
            shown = ", ".join(sorted(served)[:8]) + (", ..." if len(served) > 8 else "")
            return f"the endpoint does not serve model {self.config.model!r} (it serves: {shown})"
        return None

    async def _send_once(self, request: dict[str, Any], *, send_response_format: bool) -> _Answer:
        common: dict[str, Any] = {"model": request["model"], "temperature": request["temperature"]}
        if request["endpoint"] == "completions":
            if request["max_completion_tokens"] is not None:
                common["max_tokens"] = request["max_completion_tokens"]
            response = await self._sdk.completions.create(prompt=request["messages"][0]["content"], **common)
        else:
            if request["max_completion_tokens"] is not None:
                common["max_completion_tokens"] = request["max_completion_tokens"]
            if send_response_format:
                common["response_format"] = request["response_format"]
            if request.get("reasoning_effort") and self.config.provider in OPENAI_COMPATIBLE_PROVIDERS:
                common["reasoning_effort"] = request["reasoning_effort"]
            response = await self._sdk.chat.completions.create(messages=request["messages"], **common)
        return _answer_from(response, completions_endpoint=request["endpoint"] == "completions")

    def estimated_cost_usd(self) -> float:
        """Cost of the tokens fetched by this client; 0.0 when the price is unknown (self-hosted, unlisted model)."""
        prices = price_per_million_tokens(self.config)
        if prices is None:
            return 0.0
        input_price, output_price = prices
        return (self.usage.prompt_tokens * input_price + self.usage.completion_tokens * output_price) / 1_000_000

    def usage_summary(self) -> dict[str, Any]:
        """Plain types only, ready for a YAML run summary."""
        prices = price_per_million_tokens(self.config)
        return {
            "provider": self.config.provider,
            "model": self.config.model,
            **dataclasses.asdict(self.usage),
            "estimated_cost_usd": round(self.estimated_cost_usd(), 6),
            "price_per_million_tokens": (
                {"input": prices[0], "output": prices[1]} if prices is not None else "unknown"
            ),
        }


def _make_sdk_client(config: LLMConfig, api_key: str) -> openai.AsyncOpenAI:
    # max_retries=0: our own loop retries, with our backoff, accounting and cache.
    import openai  # imported on first use: the offline path never needs it

    if config.provider not in OPENAI_COMPATIBLE_PROVIDERS:
        return _native_client(config, api_key)  # type: ignore[return-value]  # shaped like the SDK client
    if config.provider == "azure":
        return openai.AsyncAzureOpenAI(
            azure_endpoint=config.api_base or "",  # LLMConfig requires api_base for azure
            api_version=config.api_version,
            api_key=api_key,
            timeout=config.timeout,
            max_retries=0,
        )
    if config.provider == "ollama":
        return openai.AsyncOpenAI(
            base_url=config.api_base or OLLAMA_API_BASE, api_key=api_key, timeout=config.timeout, max_retries=0
        )
    return openai.AsyncOpenAI(base_url=config.api_base, api_key=api_key, timeout=config.timeout, max_retries=0)


def _native_client(config: LLMConfig, api_key: str) -> Any:
    """Anthropic's messages API or Bedrock's Converse API, keys and region from Rasa's environment variables."""
    from recipe.providers import ANTHROPIC_API_BASE, AnthropicClient, BedrockClient

    if config.provider == "anthropic":
        return AnthropicClient(
            api_base=config.api_base or ANTHROPIC_API_BASE,
            timeout=config.timeout,
            api_key=api_key,
            reasoning_effort=config.reasoning_effort,
        )
    region = (
        config.aws_region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    )
    bearer = os.environ.get("AWS_BEARER_TOKEN_BEDROCK") if not config.api_key_env else None
    if not bearer and not os.environ.get("AWS_ACCESS_KEY_ID"):
        raise ConfigError(
            "provider 'bedrock' signs with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or uses "
            "AWS_BEARER_TOKEN_BEDROCK); AWS_ACCESS_KEY_ID is not set"
        )
    return BedrockClient(
        api_base=config.api_base or f"https://bedrock-runtime.{region}.amazonaws.com",
        timeout=config.timeout,
        region=region,
        bearer_token=bearer or None,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=None if bearer else api_key,
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        reasoning_effort=config.reasoning_effort,
    )


def _answer_from(response: Any, *, completions_endpoint: bool) -> _Answer:
    choices = getattr(response, "choices", None)
    if not choices:
        raise _MalformedAnswer(f"no choices in answer: {str(response)[:200]}")
    choice = choices[0]
    text = choice.text if completions_endpoint else choice.message.content
    usage = getattr(response, "usage", None)
    return _Answer(
        text=text or "",
        finish_reason=choice.finish_reason,
        prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
        completion_tokens=getattr(usage, "completion_tokens", None) or 0,
    )


def _incomplete(text: str, finish_reason: str | None) -> bool:
    return finish_reason == "length" or not text.strip()


def _secret_patterns(api_key: str) -> list[re.Pattern[str]]:
    """The key, whole or cut, and the masked forms servers echo (`sk-proj-****wxyz`): its first 8 characters and
    what follows them, and stars followed by its last 4."""
    if not api_key or api_key == SELF_HOSTED_DUMMY_KEY or len(api_key) < 8:
        return []
    return [re.compile(re.escape(api_key[:8]) + r"\S*"), re.compile(r"\S*\*{3,}" + re.escape(api_key[-4:]))]


def _is_retryable(error: Exception) -> bool:
    import openai  # imported on first use: the offline path never needs it

    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS_CODES or error.status_code >= 500
    # Timeouts and dropped connections (APITimeoutError is an APIConnectionError), and broken bodies.
    return isinstance(
        error, (openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError, _MalformedAnswer)
    )


def _mentions_json_mode(error: openai.BadRequestError) -> bool:
    text = f"{error} {error.body}".lower()
    return "response_format" in text or "json" in text


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, then `Retry-After` (seconds or an HTTP date)."""
    try:
        if (milliseconds := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(milliseconds) / 1000)
        if (value := headers.get("retry-after")) is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError):
        pass  # an unparseable header: fall back to our own backoff
    return None


def _describe(error: Exception) -> str:
    """One line naming the error kind and what the server said."""
    status = getattr(error, "status_code", None)
    prefix = f"HTTP {status}" if status is not None else type(error).__name__
    message = " ".join(str(error).split())
    return f"{prefix}: {message[:500]}"
