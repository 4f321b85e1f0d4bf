"""The command generator at runtime: render the prompt the model was trained with, call the model, parse, validate.

    project = load_project("my_assistant")
    generator = CommandGenerator.for_model(project, LocalModelBackend("outputs/cmdgen"), training_info=...)
    state = conversation_state(project, [("user", "hi"), ("bot", "Hello! How can I help?")])
    prediction = generator.predict(state, "book a hotel in Lisbon")
    prediction.commands   # (StartFlow('book_hotel'), SetSlot('hotel_city', 'Lisbon'))
    prediction.dropped    # ((SetSlot('hotel_stars', '5'), 'unknown slot `hotel_stars`; ...'),)

The prompt comes from the same renderer and template as the training rows; the template's sha256 is checked against
the one recorded at training time, and a mismatch is a loud warning (the model would see prompts it never saw).
Commands the assistant cannot act on are dropped, each with its reason, instead of silently
(`recipe.command_validation`). The models behind it are `recipe.backends`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from recipe.artifacts import TRAINING_INFO_FILE
from recipe.backends import Backend
from recipe.command_validation import Dropped, validate_commands
from recipe.commands import Command, Syntax, parse_model_output
from recipe.errors import ConfigError
from recipe.grammar import CommandGrammar, build_grammar, fillable_slots
from recipe.project import Project
from recipe.prompt import (
    PromptRenderer,
    PromptTemplate,
    choose_syntax,
    choose_template,
    load_template,
    prompt_variables,
)
from recipe.tracker import DialogueState, FrameView, TranscriptLine, startable_flows

log = logging.getLogger(__name__)

SPEAKERS = {"user": "USER", "human": "USER", "USER": "USER", "bot": "AI", "assistant": "AI", "ai": "AI", "AI": "AI"}


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
