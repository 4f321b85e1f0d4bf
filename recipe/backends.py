"""Model backends: a model that answers one rendered prompt, on this machine or behind an endpoint.

`LocalModelBackend` (transformers; a `recipe finetune` folder with its adapter or merged model, any adapter folder,
any model folder or hub id) and `OpenAIBackend` (any OpenAI-compatible endpoint: vLLM, `recipe serve`, OpenAI). Both
decode greedily, stop at the end of the answer and bound its length; both can constrain the answer to the assistant's
command grammar (`recipe.grammar`): vLLM through `structured_outputs`, locally with a logits processor. torch,
transformers and openai are imported on first use.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from recipe.artifacts import MERGED_DIR, read_training_info
from recipe.decoding import CommandLogitsProcessor, TokenConstraint, TokenVocabulary, token_constraint
from recipe.errors import ConfigError, RecipeError
from recipe.grammar import CommandGrammar
from recipe.llm import SELF_HOSTED_DUMMY_KEY, RetryPolicy

if TYPE_CHECKING:
    import openai

    from recipe.finetune.generate import Finetuned

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64  # a command answer is ~10 tokens; this bounds a model that never stops
# The retry policy of `recipe.llm.LLMClient` (same errors retried, same backoff and `Retry-After` rules), with other
# numbers: a user turn (or an evaluation turn) waits on this answer, so two retries after about 0.5 s and 1 s (the
# openai SDK's defaults, which this backend used before), not the data pipeline's six over a minute and more.
ENDPOINT_RETRY = RetryPolicy(max_retries=2, backoff_base_s=0.5, backoff_cap_s=8.0, max_retry_after_s=60.0)


class BackendError(RecipeError):
    """A model call that failed; `fatal` when every further call would fail the same way (bad URL, key, model)."""

    def __init__(self, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (ended by itself) or "length" (cut at the token bound)
    latency_s: float


class Backend(Protocol):
    """A model that answers one prompt; `grammar` asks it to stay inside the assistant's command language."""

    name: str

    def complete(self, prompt: str, *, grammar: CommandGrammar | None = None) -> Completion: ...


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


@dataclass(frozen=True)
class ModelSource:
    """Where a local model's weights come from: a full model (folder or hub id), or a base plus a LoRA adapter."""

    weights: str  # model folder or hub id; the base model when `adapter` is set
    adapter: Path | None
    tokenizer: str
    training_info: dict[str, Any] | None

    def describe(self) -> str:
        """What is served, for the start-up line: the merged model, the adapter on its base, or a plain model."""
        if self.adapter is not None:
            return f"the adapter {self.adapter} on its base {self.weights}"
        if Path(self.weights).name == MERGED_DIR:
            return f"the merged model {self.weights}"
        return f"the model {self.weights}"


def resolve_model(model: str | Path, *, base_model: str | None = None, variant: str = "auto") -> ModelSource:
    """Find the weights behind `--model`: a `recipe finetune` folder (its merged model or adapter), an adapter folder
    (detected by adapter_config.json; base from it or `base_model`), a model folder, a `.gguf` file, or a hub id."""
    if variant not in ("auto", "merged", "adapter"):
        raise ConfigError(f"model variant {variant!r}: expected auto, merged or adapter")
    from recipe.finetune.gguf import is_gguf, resolve_gguf_model

    if base_model is not None and is_gguf(base_model):
        base_model = resolve_gguf_model(base_model)
    if is_gguf(model):  # a .gguf base model: its converted Hugging Face folder (made once, then reused)
        model = Path(resolve_gguf_model(str(model)))
    text = str(model)
    path = Path(text).expanduser()
    if not path.exists():
        if _looks_like_path(text) or isinstance(model, Path):
            raise ConfigError(f"{text}: model folder not found")
        return ModelSource(text, None, text, None)  # a hub id; loading says whether it is cached
    if not path.is_dir():
        raise ConfigError(f"{text}: expected a model folder, got a file")
    info = read_training_info(path)
    merged = path / MERGED_DIR
    if variant == "merged" and not merged.is_dir():
        raise ConfigError(f"{text}: no merged model in {merged} (train with --merge, or use the adapter)")
    if variant != "adapter" and merged.is_dir():
        return ModelSource(str(merged), None, str(merged), info)
    if (path / "adapter_config.json").is_file():
        return ModelSource(_adapter_base(path, base_model, info), path, str(path), info)
    if variant == "adapter":
        raise ConfigError(f"{text}: no LoRA adapter here (adapter_config.json missing)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{text}: not a model folder (no config.json, adapter_config.json or {MERGED_DIR}/)")
    return ModelSource(str(path), None, str(path), info)


def _adapter_base(adapter_dir: Path, explicit: str | None, info: dict[str, Any] | None) -> str:
    if explicit:
        return explicit
    try:
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{adapter_dir}/adapter_config.json: not valid JSON ({error.msg})") from None
    base = recorded.get("base_model_name_or_path") or ((info or {}).get("training") or {}).get("base_model")
    if not base:
        raise ConfigError(f"{adapter_dir}: the adapter does not name its base model; pass --base-model")
    if _looks_like_path(base) and not Path(base).expanduser().exists():
        # PEFT stores the base path as given at training time; it may be relative or on another machine.
        raise ConfigError(f"{adapter_dir}: the adapter's base model {base} is not here; pass --base-model PATH_OR_ID")
    return base


class LocalModelBackend:
    """A transformers model on this machine: greedy decoding, stop at the trained end token, bounded length.

    The prompt is encoded as in training (`recipe.finetune.data.encode_prompt`): one user message through the chat
    template, no system prompt, or the raw string when the model was trained on raw prompts.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        base_model: str | None = None,
        variant: str = "auto",
        max_new_tokens: int = DEFAULT_MAX_TOKENS,
        dtype: str = "auto",
        threads: int | None = None,
        name: str | None = None,
    ):
        import torch

        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        # CPU threads per generation, applied in whichever thread generates: torch's setting is per thread, and a
        # server's worker threads would otherwise not get the process default.
        self.threads = threads or torch.get_num_threads()
        self.source = resolve_model(model, base_model=base_model, variant=variant)
        self.name = name or Path(str(model)).name or str(model)
        self.max_new_tokens = max_new_tokens
        self.finetuned = _load(self.source, dtype)
        self._lock = threading.Lock()  # one generate at a time: the model is not shared safely across threads
        self._constraints: dict[int, tuple[CommandGrammar, TokenConstraint]] = {}
        self._vocabulary: TokenVocabulary | None = None

    @property
    def training_info(self) -> dict[str, Any] | None:
        return self.source.training_info

    @property
    def tokenizer(self) -> Any:
        return self.finetuned.tokenizer

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.finetuned.encode(list(messages))

    def encode_text(self, text: str) -> list[int]:
        """A raw prompt (the `/completions` route): tokenized as is, no chat template."""
        return list(self.tokenizer(text)["input_ids"])

    def complete(self, prompt: str, *, grammar: CommandGrammar | None = None) -> Completion:
        return self.generate(self.finetuned.encode(prompt), max_new_tokens=self.max_new_tokens, grammar=grammar)

    def generate(
        self,
        input_ids: list[int],
        *,
        max_new_tokens: int,
        grammar: CommandGrammar | None = None,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
    ) -> Completion:
        """Generate after `input_ids`; greedy unless `temperature` > 0; `stop` strings end the answer early."""
        import torch
        from transformers import LogitsProcessorList

        model = self.finetuned.model
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        stops = {"stop_strings": list(stop), "tokenizer": self.tokenizer} if stop else {}
        started = time.perf_counter()
        # Under the lock: the grammar's automaton and token masks are built lazily, as generation reaches them.
        with self._lock, torch.inference_mode(), _torch_threads(self.threads):
            processors = LogitsProcessorList()
            if grammar is not None:
                processors.append(
                    CommandLogitsProcessor(
                        self._constraint(grammar), len(input_ids), max_new_tokens, greedy=temperature == 0
                    )
                )
            output = model.generate(
                input_ids=torch.tensor([input_ids], device=model.device),
                attention_mask=torch.ones(1, len(input_ids), dtype=torch.long, device=model.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.finetuned.stop_ids,
                pad_token_id=self._pad_id(),
                logits_processor=processors,
                **sampling,
                **stops,
            )
        latency = time.perf_counter() - started
        new_ids = output[0, len(input_ids) :].tolist()
        ends = [index for index, token_id in enumerate(new_ids) if token_id in self.finetuned.stop_ids]
        stopped = bool(ends)
        new_ids = new_ids[: ends[0] + 1] if ends else new_ids
        text = self.finetuned.decode(new_ids)
        hit_stop = next((s for s in stop if s in text), None)
        if hit_stop is not None:
            text = text[: text.index(hit_stop)]
        return Completion(text, len(input_ids), len(new_ids), "stop" if stopped or hit_stop else "length", latency)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.finetuned.stop_ids[0]

    def _constraint(self, grammar: CommandGrammar) -> TokenConstraint:
        # One per grammar (kept alive beside it, so its id stays unique): the allowed tokens per state are cached.
        key = id(grammar)
        if key not in self._constraints:
            if self._vocabulary is None:
                self._vocabulary = TokenVocabulary.from_tokenizer(self.tokenizer)
            constraint = token_constraint(grammar, self.tokenizer, self.finetuned.stop_ids, self._vocabulary)
            self._constraints[key] = (grammar, constraint)
        return self._constraints[key][1]


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """`count` intra-op threads in this thread for the block, then the caller's setting again."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load(source: ModelSource, dtype: str) -> Finetuned:
    """Tokenizer, model (adapter merged in memory: the same function, faster on CPU) and the trained prompt format."""
    from recipe.finetune import data
    from recipe.finetune.generate import Finetuned
    from recipe.finetune.model import first_line, load_tokenizer

    tokenizer = load_tokenizer(source.tokenizer)
    training = (source.training_info or {}).get("training") or {}
    try:
        model = _load_weights(source, _torch_dtype(dtype, training.get("precision")))
    except (OSError, ValueError) as error:
        where = "" if Path(source.weights).exists() else " (not a local folder, nor a model in the hub cache)"
        raise ConfigError(f"model {source.weights}{where}: cannot load it: {first_line(error)}") from None
    if training.get("prompt_format") and training.get("end_token"):
        prompt_format = data.PromptFormat(
            training["prompt_format"], training["end_token"], training.get("answer_prefix") or ""
        )
    else:
        probe = data.Example(prompt=({"role": "user", "content": "hello"},), completion="cancel flow", path="", line=0)
        prompt_format = data.choose_prompt_format(tokenizer, "auto", probe)
    return Finetuned(model.eval(), tokenizer, prompt_format)


def _torch_dtype(requested: str, trained: str | None) -> Any:
    import torch

    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if requested == "auto":
        # CPUs run fp32 fastest; GPUs serve in the precision the model was trained in.
        return choices.get(trained or "bf16", torch.bfloat16) if torch.cuda.is_available() else torch.float32
    if requested not in choices:
        raise ConfigError(f"dtype {requested!r}: expected auto, fp32, bf16 or fp16")
    return choices[requested]


def _load_weights(source: ModelSource, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    placement = "auto" if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype, device_map=placement)
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter)).merge_and_unload()
    return model


class OpenAIBackend:
    """Any OpenAI-compatible endpoint (vLLM, `recipe serve`, OpenAI): temperature 0, bounded `max_tokens`.

    `use_completions` sends the raw prompt to `/completions` (a model trained on raw prompts); otherwise one user
    message goes to `/chat/completions`, as Rasa Pro sends it. A grammar is sent as vLLM's `structured_outputs`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        use_completions: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        timeout_s: float = 60.0,
        max_retries: int = ENDPOINT_RETRY.max_retries,
        name: str | None = None,
    ):
        import openai

        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint {base_url!r}: expected an http(s):// URL such as http://127.0.0.1:8000/v1")
        if not model:
            raise ConfigError(f"endpoint {base_url}: name the model to call (--endpoint-model)")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or model
        self.use_completions = use_completions
        self.max_tokens = max_tokens
        self.retry = replace(ENDPOINT_RETRY, max_retries=max_retries)
        self._jitter = random.Random()
        # max_retries=0: `complete` retries, as `self.retry` says.
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or SELF_HOSTED_DUMMY_KEY, timeout=timeout_s, max_retries=0
        )

    def complete(self, prompt: str, *, grammar: CommandGrammar | None = None) -> Completion:
        import openai

        extra: dict[str, Any] = (
            {"extra_body": {"structured_outputs": grammar.structured_outputs()}} if grammar is not None else {}
        )
        started = time.perf_counter()
        retry_number = 0
        while True:
            try:
                response = self._send(prompt, extra)
                break
            except (openai.APIStatusError, openai.APIConnectionError) as error:
                if retry_number == self.retry.max_retries or not self.retry.retryable(error):
                    raise self._failure(error) from None
                delay = self.retry.delay(error, retry_number=retry_number, jitter=self._jitter)
                log.info("%s; retry in %.2fs", self._failure(error), delay)
                retry_number += 1
                time.sleep(delay)
        latency = time.perf_counter() - started
        if not response.choices:
            raise BackendError(f"endpoint {self.base_url} ({self.model}): answer without choices")
        choice = response.choices[0]
        text = choice.text if self.use_completions else choice.message.content
        usage = response.usage
        return Completion(
            text or "",
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
            choice.finish_reason or "stop",
            latency,
        )

    def _send(self, prompt: str, extra: dict[str, Any]) -> Any:
        if self.use_completions:
            return self._client.completions.create(
                model=self.model, prompt=prompt, temperature=0, max_tokens=self.max_tokens, **extra
            )
        return self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_completion_tokens=self.max_tokens,
            **extra,
        )

    def _failure(self, error: openai.APIStatusError | openai.APIConnectionError) -> BackendError:
        import openai

        if isinstance(error, openai.APIStatusError):
            said = error.body.get("message") if isinstance(error.body, dict) else None
            return BackendError(
                f"endpoint {self.base_url} ({self.model}): HTTP {error.status_code}: "
                f"{_one_line(str(said or error.message))}",
                fatal=error.status_code in (400, 401, 403, 404),
            )
        return BackendError(
            f"endpoint {self.base_url}: cannot connect ({_one_line(str(error))})",
            fatal=not isinstance(error, openai.APITimeoutError),
        )


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
