"""Rendering the command generator's prompt exactly as the runtime does (rasa-formats.md §6).

The variables, their order and their string forms follow the runtime's semantics, so a template written for the
runtime renders here byte for byte as it would there. Without `project.flow_retrieval` every startable user flow is in
the prompt, in file order (the runtime with retrieval off); with it, the flows retrieval selects, in its order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from recipe.commands import Syntax
from recipe.errors import ConfigError
from recipe.project import Project
from recipe.tracker import DialogueState, TranscriptLine, startable_flows
from recipe.types import Flow, Slot, Step

log = logging.getLogger("recipe")

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
DEFAULT_TEMPLATES = {
    Syntax.V1: "command_prompt_v1.jinja2",
    Syntax.V2: "command_prompt_v2.jinja2",
    Syntax.V3: "command_prompt_v3.jinja2",  # as v2, but knowledge is `search and reply` in this dialect
}
TRANSCRIPT_LINES = 20


# ---------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class PromptTemplate:
    text: str
    path: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_template(path: Path) -> PromptTemplate:
    try:
        return PromptTemplate(text=path.read_text(encoding="utf-8"), path=str(path))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read prompt template ({error.strerror}); expected a Jinja2 file") from None


def choose_template(project: Project, syntax: Syntax, explicit: Path | None = None) -> PromptTemplate:
    """`--prompt-template` wins, then the project's config.yml, then our default for the syntax."""
    if explicit is not None:
        return load_template(explicit)
    if project.config.prompt_template is not None:
        if not project.config.prompt_template.is_file():
            raise ConfigError(f"{project.config.prompt_template_where}: prompt template "
                              f"`{project.config.prompt_template}` not found")  # fmt: skip
        return load_template(project.config.prompt_template)
    return load_template(PROMPTS_DIR / DEFAULT_TEMPLATES[syntax])


def choose_syntax(project: Project, explicit: str | None = None) -> Syntax:
    """`--command-syntax` wins, then the command generator named in config.yml, then v2."""
    if explicit:
        try:
            return Syntax(explicit)
        except ValueError:
            raise ConfigError(f"--command-syntax {explicit}: expected one of v1, v2, v3") from None
    if project.config.syntax is None and project.config.generator:
        log.warning("%s: the command generator `%s` is the project's own and recipe cannot tell which syntax it "
                    "parses; using v2 (`start flow x`). Pass --command-syntax v1|v2|v3 to choose",
                    project.config.generator_where, project.config.generator)  # fmt: skip
    return project.config.syntax or Syntax.V2


_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False)  # = json.dumps(value, ensure_ascii=False), built once


def _to_json_escaped_string(value: Any) -> str:
    return _JSON_ENCODER.encode(value)


def jinja_environment() -> jinja2.Environment:
    # As at runtime: autoescape off, no trim/lstrip, the template's final newline dropped, one custom filter.
    environment = jinja2.Environment(autoescape=False, undefined=jinja2.Undefined)
    environment.filters["to_json_escaped_string"] = _to_json_escaped_string
    return environment


# What the runtime passes to a command-generator template (rasa-formats.md §6).
COMMAND_PROMPT_VARIABLES = frozenset({
    "available_flows", "current_conversation", "current_flow", "current_slot", "current_slot_description",
    "flow_slots", "user_message", "current_datetime",
})  # fmt: skip


class PromptRenderer:
    """A compiled template; `render` fills it with the variables of one turn.

    With `known_variables`, a variable the template uses but nobody sets (a typo such as `avaliable_flows`) is
    reported once: it renders empty, exactly as at runtime, which silently ruins every prompt.
    """

    def __init__(self, template: PromptTemplate, known_variables: frozenset[str] | None = None):
        self.template = template
        environment = jinja_environment()
        try:
            self._compiled = environment.from_string(template.text)
            used = jinja2.meta.find_undeclared_variables(environment.parse(template.text))
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(f"{template.path}:{error.lineno}: template syntax error: {error.message}") from None
        unknown = sorted(used - known_variables) if known_variables is not None else []
        if unknown:
            log.warning("%s uses %s, which %s never set: %s render empty", template.path,
                        ", ".join(f"`{name}`" for name in unknown), "the runtime and recipe",
                        "it" if len(unknown) == 1 else "they")  # fmt: skip

    def render(self, variables: dict[str, Any]) -> str:
        try:
            return self._compiled.render(**variables)
        except jinja2.TemplateError as error:
            raise ConfigError(f"{self.template.path}: the template fails to render: {error}") from None


def syntax_mismatch(template: PromptTemplate, syntax: Syntax) -> str | None:
    """Why the template seems to ask for another command syntax than the completions use (None if it does not)."""
    mentions_v1 = "StartFlow(" in template.text or "SetSlot(" in template.text
    mentions_words = "start flow" in template.text or "set slot" in template.text
    if syntax is Syntax.V1 and mentions_words and not mentions_v1:
        return f"{template.path} describes commands like `start flow x`, but the completions use v1 (`StartFlow(x)`)"
    if syntax is not Syntax.V1 and mentions_v1 and not mentions_words:
        return f"{template.path} describes commands like `StartFlow(x)`, but the completions use {syntax.value}"
    return None


# ---------------------------------------------------------------------------------------------- variables


def _allowed_values(slot: Slot) -> str | None:
    # A Python list repr in a string, exactly as the runtime builds it.
    if slot.type == "bool":
        return str([True, False])
    if slot.type == "categorical":
        return str(list(slot.values))
    return None


def _steps_in_text_order(flow: Flow) -> list[Step]:
    """A flow's steps as the runtime lists them: each step, then the steps nested under its `next`, then the step
    after it (depth first), which is the order they are written in; steps read without a line keep their order."""
    indexed = list(enumerate(flow.steps.values()))
    indexed.sort(key=lambda item: (item[1].location.line is None, item[1].location.line or 0, item[0]))
    return [step for _, step in indexed]


def _collect_steps_uncached(project: Project, flow: Flow, calling: tuple[str, ...] = ()) -> list[Step]:
    steps: list[Step] = []
    for step in _steps_in_text_order(flow):
        if step.kind == "collect":
            steps.append(step)
        elif step.kind == "call" and step.call in project.flows and step.call not in calling + (flow.id,):
            # the called flow's collect steps, where it is called (every time it is called)
            steps.extend(_collect_steps_uncached(project, project.flows[step.call], calling + (flow.id,)))
    return steps


_COLLECT_STEPS_CACHE: dict[tuple[int, int], tuple[Project, Flow, list[Step]]] = {}


def _collect_steps(project: Project, flow: Flow) -> list[Step]:
    """Collect steps of a flow and of the flows it reaches through `call`, in step order (computed once per flow)."""
    key = (id(project), id(flow))
    cached = _COLLECT_STEPS_CACHE.get(key)
    if cached is None or cached[0] is not project or cached[1] is not flow:
        cached = (project, flow, _collect_steps_uncached(project, flow))
        _COLLECT_STEPS_CACHE[key] = cached
    return cached[2]


def _extractable(project: Project, step: Step, slots: dict[str, Any], asked_slot: str | None = None) -> bool:
    if step.collect not in project.domain.slots:
        return False
    return not step.ask_before_filling or slots.get(step.collect) is not None or step.collect == asked_slot


def _value_text(value: Any) -> str:
    return "undefined" if value is None else str(value)


def transcript_lines(lines: tuple[TranscriptLine, ...] | list[TranscriptLine]) -> list[str]:
    """`USER: ...` and `AI: ...` lines as the runtime writes them (buttons appended, empty bot messages left out)."""
    rendered = []
    for line in lines:
        text = _one_line(line.text) if line.text else ""
        if line.speaker == "AI":
            if not text and not line.buttons:
                continue  # a bot message with neither text nor buttons is not shown
            if line.buttons:
                suffix = ", ".join(f'button {i}: "{b.title}"' for i, b in enumerate(line.buttons, start=1))
                text = f"{text} {suffix}" if text else suffix
        rendered.append(f"{line.speaker}: {text}")
    return rendered


def transcript_text(lines: tuple[TranscriptLine, ...] | list[TranscriptLine], user_message: str) -> str:
    """The last 20 lines of the conversation, then the new user message after a newline."""
    history = "\n".join(transcript_lines(lines)[-TRANSCRIPT_LINES:])
    return f"{history}\nUSER: {_one_line(user_message)}"


def _one_line(text: str) -> str:
    return text.replace("\n", " ")  # as the runtime does: each newline becomes a space, nothing else changes


def prompt_variables(
    project: Project, state: DialogueState, user_message: str, current_datetime: datetime | None
) -> dict[str, Any]:
    """Every variable the runtime passes to the command generator's template."""
    slots = state.slots
    available_flows = []
    flows = startable_flows(project, slots)
    if project.flow_retrieval is not None:  # the runtime's selection and order (recipe/retrieval.py)
        flows = project.flow_retrieval.select(project, flows, state, user_message)
    for flow in flows:
        flow_slot_entries = []
        for step in _collect_steps(project, flow):
            if _extractable(project, step, slots):
                slot = project.domain.slots[step.collect or ""]
                flow_slot_entries.append(
                    {"name": slot.name, "description": step.description, "allowed_values": _allowed_values(slot)}
                )
        available_flows.append({"name": flow.id, "description": flow.description, "slots": flow_slot_entries})

    current_flow = None
    for frame in reversed(state.stack):
        if frame.kind != "called" and frame.flow_id != "pattern_collect_information":
            current_flow = frame.flow_id
            break
    current_slot = current_slot_description = None
    if state.stack:
        top = state.stack[-1]
        flow = project.flows.get(top.flow_id)
        step = flow.steps.get(top.step_id) if flow else None
        if step is not None and step.kind == "collect":
            current_slot, current_slot_description = step.collect, step.description

    flow_slots = []
    if current_flow in project.flows:
        seen: set[tuple[str, str | None]] = set()
        for step in _collect_steps(project, project.flows[current_flow]):
            key = (step.collect or "", step.description)
            if key in seen or not _extractable(project, step, slots, current_slot):
                continue
            seen.add(key)
            slot = project.domain.slots[step.collect or ""]
            flow_slots.append(
                {
                    "name": slot.name,
                    "value": _value_text(slots.get(slot.name)),
                    "type": slot.type,
                    "allowed_values": _allowed_values(slot),
                    "description": step.description,
                }
            )
    return {
        "available_flows": available_flows,
        "current_conversation": transcript_text(state.transcript, user_message),
        "current_flow": current_flow,
        "current_slot": current_slot,
        "current_slot_description": current_slot_description,
        "flow_slots": flow_slots,
        "user_message": _one_line(user_message),
        "current_datetime": current_datetime,
    }


# ---------------------------------------------------------------------------------------------- date and time


def conversation_datetime(conversation_id: str, seed: int, mocked: Any = None) -> datetime:
    """A date for a conversation's prompts: the `mocked_datetime` fixture if set, else one derived from the seed.

    Never the wall clock: the same conversation gets the same date on every run, different conversations get
    varied dates (within 2025-2027) so the model does not learn one fixed day.
    """
    if mocked is not None:
        value = mocked if isinstance(mocked, datetime) else datetime.fromisoformat(str(mocked))
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    rng = random.Random(digest)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    return start + timedelta(days=rng.randrange(3 * 365), seconds=rng.randrange(8 * 3600, 22 * 3600))


@dataclass(frozen=True)
class DatetimePolicy:
    """Which date and time a conversation's prompts show. Never the wall clock."""

    include: bool = True
    fixed: datetime | None = None
    seed: int = 42

    def for_conversation(self, conversation_id: str, mocked: Any = None) -> datetime | None:
        if not self.include:
            return None
        if mocked is not None or self.fixed is None:
            return conversation_datetime(conversation_id, self.seed, mocked)
        return self.fixed
