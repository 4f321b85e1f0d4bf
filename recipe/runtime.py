"""The command generator at runtime: render the prompt the model was trained with, call the model, parse, validate.

    project = load_project("my_assistant")
    generator = CommandGenerator.for_model(project, LocalModelBackend("outputs/cmdgen"), training_info=...)
    state = conversation_state(project, [("user", "hi"), ("bot", "Hello! How can I help?")])
    prediction = generator.predict(state, "book a hotel in Lisbon")
    prediction.commands   # (StartFlow('book_hotel'), SetSlot('hotel_city', 'Lisbon'))
    prediction.dropped    # ((SetSlot('hotel_stars', '5'), 'unknown slot `hotel_stars`; ...'),)

The prompt comes from the same renderer and template as the training rows; the template's sha256 is checked against
the one recorded at training time, and a mismatch is a loud warning (the model would see prompts it never saw).
Commands the assistant cannot act on are dropped, each with its reason, instead of silently (rasa-formats §5.2).

Backends: `LocalModelBackend` (transformers; a `recipe finetune` folder with its adapter or merged model, any adapter
folder, any model folder or hub id) and `OpenAIBackend` (any OpenAI-compatible endpoint: vLLM, `recipe serve`,
OpenAI). Both decode greedily, stop at the end of the answer and bound its length; both can constrain the answer to
the assistant's command grammar (`recipe.grammar`): vLLM through `structured_outputs`, locally with a logits processor.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from recipe.artifacts import MERGED_DIR, TRAINING_INFO_FILE, read_training_info
from recipe.commands import (
    Clarify,
    Command,
    ContinueAgent,
    RestartAgent,
    SetSlot,
    StartFlow,
    Syntax,
    parse_model_output,
)
from recipe.decoding import CommandLogitsProcessor, TokenConstraint, TokenVocabulary, token_constraint
from recipe.errors import ConfigError, RecipeError
from recipe.grammar import CommandGrammar, build_grammar, fillable_slots, startable_flow_ids
from recipe.project import Project, command_problem
from recipe.prompt import (
    PromptRenderer,
    PromptTemplate,
    choose_syntax,
    choose_template,
    load_template,
    prompt_variables,
)
from recipe.tracker import DialogueState, FrameView, TranscriptLine, startable_flows

if TYPE_CHECKING:
    from recipe.finetune.generate import Finetuned

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64  # a command answer is ~10 tokens; this bounds a model that never stops
SPEAKERS = {"user": "USER", "human": "USER", "USER": "USER", "bot": "AI", "assistant": "AI", "ai": "AI", "AI": "AI"}


class BackendError(RecipeError):
    """A model call that failed; `fatal` when every further call would fail the same way (bad URL, key, model)."""

    def __init__(self, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


# ---------------------------------------------------------------------------------------------- backends


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
        max_retries: int = 2,
        name: str | None = None,
    ):
        import openai

        from recipe.llm import SELF_HOSTED_DUMMY_KEY

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
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or SELF_HOSTED_DUMMY_KEY, timeout=timeout_s, max_retries=max_retries
        )

    def complete(self, prompt: str, *, grammar: CommandGrammar | None = None) -> Completion:
        import openai

        extra: dict[str, Any] = (
            {"extra_body": {"structured_outputs": grammar.structured_outputs()}} if grammar is not None else {}
        )
        started = time.perf_counter()
        try:
            if self.use_completions:
                response = self._client.completions.create(
                    model=self.model, prompt=prompt, temperature=0, max_tokens=self.max_tokens, **extra
                )
            else:
                response = self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=0,
                    max_completion_tokens=self.max_tokens,
                    **extra,
                )
        except openai.APIStatusError as error:
            fatal = error.status_code in (400, 401, 403, 404)
            said = error.body.get("message") if isinstance(error.body, dict) else None
            raise BackendError(
                f"endpoint {self.base_url} ({self.model}): HTTP {error.status_code}: "
                f"{_one_line(str(said or error.message))}",
                fatal=fatal,
            ) from None
        except openai.APIConnectionError as error:
            raise BackendError(
                f"endpoint {self.base_url}: cannot connect ({_one_line(str(error))})",
                fatal=not isinstance(error, openai.APITimeoutError),
            ) from None
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


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# ---------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Dropped:
    """A line that did not parse (`item` is the text) or a command the assistant cannot act on, and why."""

    item: Command | str
    reason: str

    @property
    def unparsed(self) -> bool:
        return isinstance(self.item, str)


def validate_commands(
    commands: Sequence[Command],
    project: Project,
    state: DialogueState | None = None,
    fillable: frozenset[str] | None = None,
) -> tuple[list[Command], list[Dropped]]:
    """Keep the commands this assistant can act on; drop the others with a reason.

    Dropped: unknown flows, flows that cannot be started now (their `if` guard fails in `state`), unknown slots,
    values a slot's type cannot hold (categorical, bool, float), slots no flow collects or the LLM may not fill,
    clarification options that are not flows (the rest of the clarification is kept).
    """
    fillable = fillable if fillable is not None else frozenset(fillable_slots(project))
    if state is not None:
        startable, why_not = (
            {flow.id for flow in startable_flows(project, state.slots)},
            "its `if` condition is false now",
        )
    else:
        startable, why_not = set(startable_flow_ids(project)), "it is reached only through a link or call"
    kept: list[Command] = []
    dropped: list[Dropped] = []
    for command in commands:
        if isinstance(command, Clarify):
            known = tuple(option for option in command.options if option in startable)
            dropped += [
                Dropped(command, f"clarify option `{option}` is not a flow that can be started")
                for option in command.options
                if option not in known
            ]
            if known:
                kept.append(command if known == command.options else Clarify(known))
            continue
        reason = command_problem(command, project)
        if reason is None and isinstance(command, StartFlow) and command.flow not in startable:
            reason = f"flow `{command.flow}` cannot be started: {why_not}"
        if reason is None and isinstance(command, SetSlot) and command.slot not in fillable:
            reason = f"slot `{command.slot}` is not filled by the command generator (no flow collects it from the LLM)"
        if reason is None and state is not None:
            reason = _agent_command_problem(command, state)
        if reason is None:
            kept.append(command)
        else:
            dropped.append(Dropped(command, reason))
    return kept, dropped


def _agent_command_problem(command: Command, state: DialogueState) -> str | None:
    """As the runtime's command clean-up: `continue agent` needs a running agent, `restart agent x` a completed x."""
    if isinstance(command, ContinueAgent) and state.active_agent is None:
        return "`continue agent` while no agent is running; the runtime drops it"
    if isinstance(command, RestartAgent):
        last = {agent: kind for kind, agent, _ in state.agent_log}
        if last.get(command.agent) != "completed":
            return f"`restart agent {command.agent}`: the agent has not completed; the runtime drops it"
    return None


# ---------------------------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class Prediction:
    """One turn's answer: the model's text, the commands kept, what was dropped and why, and what it cost."""

    prompt: str
    raw_text: str
    commands: tuple[Command, ...]
    dropped: tuple[Dropped, ...]
    latency_s: float  # the model call
    overhead_s: float  # render + parse + validate around it
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @property
    def parseable(self) -> bool:
        """Every non-blank line of the answer is a command (an empty answer is not)."""
        return bool(self.raw_text.strip()) and not any(d.unparsed for d in self.dropped)

    @property
    def invalid(self) -> tuple[Dropped, ...]:
        return tuple(d for d in self.dropped if not d.unparsed)


def conversation_state(
    project: Project,
    turns: Sequence[tuple[str, str]],
    *,
    slots: dict[str, Any] | None = None,
    active_flow: str | None = None,
    requested_slot: str | None = None,
) -> DialogueState:
    """A dialogue state from plain data: (speaker, text) turns (`user`/`bot`), slot values, the flow in progress and
    the slot it asks for. For a live assistant, where no test conversation is replayed."""
    transcript = []
    for speaker, text in turns:
        if speaker not in SPEAKERS:
            raise ConfigError(f"speaker {speaker!r}: expected user or bot")
        transcript.append(TranscriptLine(SPEAKERS[speaker], text))
    values = {n: s.initial_value for n, s in project.domain.slots.items() if s.initial_value is not None}
    for name, value in (slots or {}).items():
        if project.slot(name) is None:
            raise ConfigError(f"slot {name!r} is not in the domain")
        values[name] = value
    stack: tuple[FrameView, ...] = ()
    if active_flow is not None:
        flow = project.flows.get(active_flow)
        if flow is None:
            raise ConfigError(f"active flow {active_flow!r} is not a flow of this assistant")
        step_id = ""  # no step: the flow is in progress but asks for nothing
        if requested_slot is not None:
            steps = [step.id for step in flow.collect_steps() if step.collect == requested_slot]
            if not steps:
                raise ConfigError(f"flow {active_flow!r} does not collect slot {requested_slot!r}")
            step_id = steps[0]
        stack = (FrameView(active_flow, "user", step_id),)
    elif requested_slot is not None:
        raise ConfigError("a requested slot needs the active flow that asks for it")
    return DialogueState(slots=values, stack=stack, transcript=tuple(transcript))


@dataclass(frozen=True)
class PromptSetup:
    """The template and syntax a model is used with, and what was found wrong about them (to be said loudly)."""

    template: PromptTemplate
    syntax: Syntax
    warnings: tuple[str, ...] = ()


def prompt_setup(
    project: Project,
    training_info: dict[str, Any] | None,
    *,
    template_path: Path | None = None,
    syntax: str | None = None,
) -> PromptSetup:
    """The template and syntax the model was trained with: explicit flags win, then the training info (its template
    text is stored there), then the project's config and our defaults. A template whose sha256 differs from the
    recorded one is a warning: the model would see prompts it never saw in training."""
    info = training_info or {}
    chosen_syntax = choose_syntax(project, syntax or info.get("command_syntax"))
    warnings: list[str] = []
    if syntax and info.get("command_syntax") and syntax != info["command_syntax"]:
        warnings.append(f"command syntax {syntax} differs from the {info['command_syntax']} the model was trained on")
    if template_path is not None:
        template = load_template(template_path)
    elif info.get("prompt_template_text"):
        template = PromptTemplate(info["prompt_template_text"], info.get("prompt_template") or TRAINING_INFO_FILE)
    elif info.get("prompt_template") and Path(info["prompt_template"]).is_file():
        template = load_template(Path(info["prompt_template"]))
    else:
        template = choose_template(project, chosen_syntax, None)
    expected = info.get("prompt_template_sha256")
    if expected and expected != template.sha256:
        warnings.append(
            f"PROMPT TEMPLATE MISMATCH: {template.path} has sha256 {template.sha256[:12]}, but the model was trained "
            f"with {info.get('prompt_template') or 'another template'} (sha256 {expected[:12]}); its answers will be "
            "unreliable. Use the template the model was trained with."
        )
    for warning in warnings:
        log.warning(warning)
    return PromptSetup(template, chosen_syntax, tuple(warnings))


@dataclass
class CommandGenerator:
    """Project + template + syntax + backend: from a conversation and a user message to validated commands."""

    project: Project
    backend: Backend
    setup: PromptSetup
    constrained: bool = False  # decode inside the command language of the assistant (and the dialogue state)
    _renderer: PromptRenderer = field(init=False, repr=False)
    _fillable: frozenset[str] = field(init=False, repr=False)
    _grammars: dict[tuple[str, ...] | None, CommandGrammar] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._renderer = PromptRenderer(self.setup.template)
        self._fillable = frozenset(fillable_slots(self.project))
        self._grammars = {}

    def grammar(self, state: DialogueState | None = None) -> CommandGrammar:
        """The valid answers in `state` (only flows whose guard passes may start), or for the project as a whole.
        One grammar per set of startable flows, so the token masks built for it are reused."""
        flows = tuple(flow.id for flow in startable_flows(self.project, state.slots)) if state is not None else None
        if flows not in self._grammars:
            self._grammars[flows] = build_grammar(self.project, self.setup.syntax, flows=flows)
        return self._grammars[flows]

    @classmethod
    def for_model(
        cls,
        project: Project,
        backend: Backend,
        *,
        training_info: dict[str, Any] | None = None,
        template_path: Path | None = None,
        syntax: str | None = None,
        constrained: bool = False,
    ) -> CommandGenerator:
        """The generator for a model, with the template and syntax it was trained with (see `prompt_setup`)."""
        if training_info is None:
            training_info = getattr(backend, "training_info", None)
        setup = prompt_setup(project, training_info, template_path=template_path, syntax=syntax)
        return cls(project, backend, setup, constrained)

    @property
    def syntax(self) -> Syntax:
        return self.setup.syntax

    def render(self, state: DialogueState, user_message: str, current_datetime: datetime | None = None) -> str:
        return self._renderer.render(prompt_variables(self.project, state, user_message, current_datetime))

    def predict(
        self,
        conversation: DialogueState | Sequence[tuple[str, str]],
        user_message: str,
        *,
        current_datetime: datetime | None = None,
    ) -> Prediction:
        """Commands for `user_message` after `conversation` (a state, or (speaker, text) turns outside any flow)."""
        started = time.perf_counter()
        state = (
            conversation if isinstance(conversation, DialogueState) else conversation_state(self.project, conversation)
        )
        prompt = self.render(state, user_message, current_datetime)
        return self._answer(prompt, state, time.perf_counter() - started)

    def predict_prompt(self, prompt: str, state: DialogueState | None = None) -> Prediction:
        """Commands for an already rendered prompt (a `val.jsonl` row)."""
        return self._answer(prompt, state, 0.0)

    def _answer(self, prompt: str, state: DialogueState | None, render_s: float) -> Prediction:
        completion = self.backend.complete(prompt, grammar=self.grammar(state) if self.constrained else None)
        started = time.perf_counter()
        parsed = parse_model_output(completion.text, self.syntax, custom=self.project.custom_commands)
        kept, invalid = validate_commands(parsed.commands, self.project, state, self._fillable)
        unparsed = [Dropped(line, f"not a command in {self.syntax.value} syntax") for line in parsed.unparsed_lines]
        return Prediction(
            prompt=prompt,
            raw_text=completion.text,
            commands=tuple(kept),
            dropped=tuple(unparsed + invalid),
            latency_s=completion.latency_s,
            overhead_s=render_s + time.perf_counter() - started,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason=completion.finish_reason,
        )
