"""Text embeddings from any OpenAI-compatible `/v1/embeddings` endpoint: synchronous, retried, cached on disk.

Flow retrieval needs embeddings while a prompt is rendered, and prompts are rendered by synchronous code (inside
the async stages of prepare-data too), so this client is synchronous. Every text is cached on its own, under a key
of what determines its vector (model, dimensions, input; not the api_base, which only says where the model runs),
so the flow documents and each distinct user message are fetched once, ever: a second run sends nothing.
A misconfigured endpoint (bad key, unknown model or route, nothing listening) is one `ConfigError` line.

    config = load_embeddings_config("embeddings.yml")
    client = EmbeddingsClient(config, cache_dir=out / "cache" / "embeddings")
    vectors = client.embed(["book a hotel", "rent a car"])
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe.cache import JsonCache
from recipe.errors import ConfigError
from recipe.llm import (
    DEFAULT_KEY_ENV_VARS,
    PROVIDERS,
    RetryPolicy,
    _describe,
    key_from_environment,
    request_key,
)

if TYPE_CHECKING:  # imported on first use: the offline path never needs it
    import openai

log = logging.getLogger("recipe")

MAX_INPUTS_PER_REQUEST = 2048  # OpenAI's limit on `input` items; bigger batches are split


@dataclass(frozen=True)
class EmbeddingsConfig:
    """Where the embedding model runs. The key comes from an environment variable, never from a file."""

    provider: str = "openai"  # openai | azure | self-hosted, as for LLM configs
    model: str = "text-embedding-3-large"
    api_base: str | None = None
    api_version: str | None = None
    api_key_env: str | None = None
    timeout: float = 30.0
    dimensions: int | None = None
    source: str = field(default="embeddings config", compare=False)  # where it was read, for error messages

    @classmethod
    def from_mapping(cls, data: Any, *, source: str, strict: bool = True) -> EmbeddingsConfig:
        """Validate a mapping; `strict` refuses unknown keys (our own files), else they are ignored (config.yml,
        whose embeddings block may carry keys for other Rasa providers)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: embeddings config must be a mapping, got {type(data).__name__}")
        values = dict(data)
        if "model_name" in values and "model" not in values:
            values["model"] = values.pop("model_name")
        if "deployment" in values and "model" not in values:  # Azure names the deployment, which is the model here
            values["model"] = values.pop("deployment")
        key = values.pop("api_key", None)
        if key is not None:
            text = str(key).strip()
            if not (text.startswith("${") and text.endswith("}")):
                raise ConfigError(
                    f"{source}: a literal `api_key` is not accepted; put the key in an environment "
                    "variable and write `api_key_env: VAR` (or `api_key: ${VAR}`)"
                )
            values.setdefault("api_key_env", text[2:-1])
        allowed = [f.name for f in fields(cls) if f.name != "source"]
        unknown = [name for name in values if name not in allowed]
        if unknown and strict:
            raise ConfigError(f"{source}: unknown embeddings config key {unknown[0]!r} (allowed: {', '.join(allowed)})")
        checked = {name: _checked(name, values[name], source) for name in allowed if name in values}
        config = cls(**checked, source=source)
        if config.provider == "azure" and (config.api_base is None or config.api_version is None):
            raise ConfigError(f"{source}: provider 'azure' needs 'api_base' and 'api_version'")
        if config.provider == "self-hosted" and config.api_base is None:
            raise ConfigError(f"{source}: provider 'self-hosted' needs 'api_base' (e.g. http://localhost:8000/v1)")
        return config

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key from the environment; a `ConfigError` when a provider that needs one has none."""
        names = (self.api_key_env,) if self.api_key_env else DEFAULT_KEY_ENV_VARS[self.provider]
        key = key_from_environment(names, environ, keyless=self.provider == "self-hosted" and not self.api_key_env)
        if key is not None:
            return key
        raise ConfigError(
            f"{self.source}: no API key for the embeddings ({self.provider} {self.model}): set {' or '.join(names)}"
        )

    def describe(self) -> dict[str, Any]:
        """Plain values for training info and params (no key)."""
        return {
            "provider": self.provider,
            "model": self.model,
            "api_base": self.api_base,
            "dimensions": self.dimensions,
        }


def _checked(name: str, value: Any, source: str) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: embeddings config key {name!r} must be {expected}, got {value!r}")

    if name == "provider":
        if value not in PROVIDERS:
            raise fail(f"one of {', '.join(PROVIDERS)} (an OpenAI-compatible /v1/embeddings endpoint)")
        return value
    if name in ("model", "api_base", "api_version", "api_key_env"):
        if (value is not None or name == "model") and (not isinstance(value, str) or not value.strip()):
            raise fail("a non-empty string")
        return value
    if name == "timeout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail("a positive number of seconds")
        return float(value)
    if name == "dimensions":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise fail("a positive integer")
        return value
    raise AssertionError(f"unchecked embeddings key {name}")


def load_embeddings_config(path: str | Path) -> EmbeddingsConfig:
    """Read `--embeddings-config FILE`: the keys at top level, or under `embeddings:`."""
    from recipe.yamlio import load_config_section

    data = load_config_section(path, "embeddings")
    return EmbeddingsConfig.from_mapping(data if data is not None else {}, source=str(path))


class EmbeddingCache(JsonCache):
    """Embeddings on disk (see `JsonCache`): one vector per entry."""

    kind = "embeddings cache"

    def check_answer(self, answer: Any) -> None:
        vector = answer["embedding"]
        if not isinstance(vector, list) or not vector or not all(isinstance(x, (int, float)) for x in vector):
            raise TypeError("not a list of numbers")

    def get_vector(self, key: str) -> list[float] | None:
        answer = self.get(key)
        return None if answer is None else [float(x) for x in answer["embedding"]]


class _Malformed(Exception):
    """A 200 whose body is not one embedding per input."""


@dataclass
class EmbeddingsUsage:
    texts: int = 0  # texts asked for
    cache_hits: int = 0  # texts answered from memory or disk
    api_calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0


class EmbeddingsClient:
    """Embeds texts through one model, caching each text's vector in memory and (with `cache_dir`) on disk."""

    def __init__(
        self,
        config: EmbeddingsConfig,
        *,
        cache_dir: str | Path | None,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 8.0,
        max_retry_after_s: float = 30.0,
        environ: Mapping[str, str] | None = None,
        seed: int | None = None,
    ):
        import openai  # imported on first use: the offline path never needs it

        self.config = config
        self.cache = EmbeddingCache(Path(cache_dir)) if cache_dir is not None else None
        self.retry = RetryPolicy(max_retries, backoff_base_s, backoff_cap_s, max_retry_after_s)
        self.usage = EmbeddingsUsage()
        self._memory: dict[str, list[float]] = {}
        self._jitter = random.Random(seed)
        key = config.api_key(environ)  # a missing key fails here, before any work
        if config.provider == "azure":
            self._sdk: openai.OpenAI = openai.AzureOpenAI(
                azure_endpoint=config.api_base,  # type: ignore[arg-type]  # the SDK takes None too (its stubs do not)
                api_version=config.api_version,
                api_key=key,
                timeout=config.timeout,
                max_retries=0,
            )
        else:
            self._sdk = openai.OpenAI(base_url=config.api_base, api_key=key, timeout=config.timeout, max_retries=0)

    def close(self) -> None:
        self._sdk.close()

    def _key(self, text: str) -> str:
        return request_key(
            {"endpoint": "embeddings", "model": self.config.model, "dimensions": self.config.dimensions, "input": text}
        )

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order. Texts not cached yet go out together in one request (split only past
        the endpoint's batch limit); raises `ConfigError` when the endpoint cannot answer."""
        self.usage.texts += len(texts)
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            if text in self._memory:
                continue
            stored = self.cache.get_vector(self._key(text)) if self.cache is not None else None
            if stored is not None:
                self._memory[text] = stored
            else:
                missing.append(text)
        self.usage.cache_hits += sum(1 for text in texts if text not in missing)
        for start in range(0, len(missing), MAX_INPUTS_PER_REQUEST):
            batch = missing[start : start + MAX_INPUTS_PER_REQUEST]
            for text, vector in zip(batch, self._fetch(batch)):
                self._memory[text] = vector
                if self.cache is not None:
                    request = {
                        "endpoint": "embeddings",
                        "model": self.config.model,
                        "dimensions": self.config.dimensions,
                        "input": text,
                    }
                    try:
                        self.cache.put(self._key(text), request, {"embedding": vector})
                    except OSError as error:
                        log.warning("could not write embeddings cache entry: %s", error)
        return [self._memory[text] for text in texts]

    def _fetch(self, batch: list[str]) -> list[list[float]]:
        import openai  # imported on first use: the offline path never needs it

        retry_number = 0
        while True:
            self.usage.api_calls += 1
            try:
                return self._send_once(batch)
            except (openai.OpenAIError, _Malformed) as error:
                retryable = isinstance(error, _Malformed) or self.retry.retryable(error)
                if not retryable or retry_number == self.retry.max_retries:
                    raise self._config_error(error, attempts=retry_number + 1) from None
                delay = self.retry.delay(error, retry_number=retry_number, jitter=self._jitter)
                log.info("embeddings call failed (%s); retry in %.2fs", _describe(error), delay)
                self.usage.retries += 1
                retry_number += 1
                time.sleep(delay)

    def _send_once(self, batch: list[str]) -> list[list[float]]:
        options: dict[str, Any] = {"model": self.config.model, "input": batch, "encoding_format": "float"}
        if self.config.dimensions is not None:
            options["dimensions"] = self.config.dimensions
        response = self._sdk.embeddings.create(**options)
        data = sorted(getattr(response, "data", None) or [], key=lambda item: item.index)
        if len(data) != len(batch):
            raise _Malformed(f"{len(data)} embeddings for {len(batch)} inputs")
        vectors = []
        for item in data:
            vector = item.embedding
            if not isinstance(vector, list) or not vector or not all(isinstance(x, (int, float)) for x in vector):
                raise _Malformed("an embedding is not a list of numbers")
            if not all(math.isfinite(x) for x in vector):
                raise _Malformed("an embedding holds NaN or infinity")
            vectors.append([float(x) for x in vector])
        if len({len(vector) for vector in vectors}) > 1:
            raise _Malformed("embeddings of different lengths")
        return vectors

    def _config_error(self, error: Exception, attempts: int) -> ConfigError:
        import openai  # imported on first use: the offline path never needs it

        where = (
            f"{self.config.source}: embeddings {self.config.provider} {self.config.model!r} at "
            f"{self.config.api_base or 'the OpenAI API'}"
        )
        status = getattr(error, "status_code", None)
        if status in (401, 403):
            config = self.config
            names = (config.api_key_env,) if config.api_key_env else DEFAULT_KEY_ENV_VARS[config.provider]
            return ConfigError(
                f"{where}: HTTP {status}, the API key was refused; set a valid key in {' or '.join(names)}"
            )
        if status == 404:
            return ConfigError(
                f"{where}: HTTP 404, no such model or route; check `model` and `api_base` (an "
                "OpenAI-compatible base URL, usually ending in /v1)"
            )
        if isinstance(error, openai.APIConnectionError):
            return ConfigError(
                f"{where}: cannot reach the endpoint after {attempts} attempt(s) "
                f"({_describe(error)}); is the server running?"
            )
        return ConfigError(f"{where}: failed after {attempts} attempt(s): {_describe(error)}")
