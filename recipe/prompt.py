"""Rendering the command generator's prompt exactly as the runtime does.

The variables, their order and their string forms follow the runtime's semantics, so a template written for the
runtime renders here byte for byte as it would there. Without `project.flow_retrieval` every startable user flow is in
the prompt, in file order (the runtime with retrieval off); with it, the flows retrieval selects, in its order.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PureWindowsPath
from typing import Any

import jinja2
import jinja2.meta

from recipe.commands import (
    AGENTS_ADDED_IN,
    HANDOFF_REMOVED_IN,
    NEWEST_RASA_VERSION,
    RasaVersion,
    Syntax,
)
from recipe.errors import ConfigError
from recipe.project import Project
from recipe.tracker import DialogueState, TranscriptLine, startable_flows
from recipe.types import Button, Flow, Slot, Step

log = logging.getLogger("recipe")


def bundled_prompts_dir() -> Path:
    """Our templates: `recipe/prompts/` in an installed wheel (package data: the build maps the top-level prompts/
    folder there), else the checkout's top-level prompts/ beside the package (editable installs, a source tree)."""
    installed = importlib.resources.files("recipe") / "prompts"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "prompts"


PROMPTS_DIR = bundled_prompts_dir()
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


def bundled_template(name: str) -> PromptTemplate:
    """One of our templates (`command_prompt_v2.jinja2`, `rephrase.jinja2`, ...), wherever the package is installed."""
    return load_template(PROMPTS_DIR / name)


def load_template(path: Path) -> PromptTemplate:
    try:
        return PromptTemplate(text=path.read_text(encoding="utf-8"), path=str(path))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read prompt template ({error.strerror}); expected a Jinja2 file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: the prompt template is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None


def choose_template(project: Project, syntax: Syntax, explicit: Path | str | None = None) -> PromptTemplate:
    """`--prompt-template` wins (`rasa:<file>` reads that template of the installed Rasa Pro), then the project's
    config.yml (its `prompt_template`; else, with Rasa Pro installed, the template Rasa picks for the generator's
    model), then our default for the syntax, with the command list of `project.rasa_version` and the project's
    custom commands."""
    users = _users_template(project, explicit)
    if users is not None:
        for warning in template_command_warnings(users, project, syntax):
            log.warning(warning)
        return users
    ours = bundled_template(DEFAULT_TEMPLATES[syntax])
    return PromptTemplate(text=command_list_for(ours.text, project, syntax), path=ours.path)


def _users_template(project: Project, explicit: Path | str | None) -> PromptTemplate | None:
    if explicit is not None:
        if str(explicit).startswith(RASA_TEMPLATE_PREFIX):
            return rasa_template(str(explicit)[len(RASA_TEMPLATE_PREFIX) :])
        return load_template(Path(explicit))
    if project.config.prompt_template is not None:
        if not project.config.prompt_template.is_file():
            raise ConfigError(
                f"{project.config.prompt_template_where}: prompt template `{project.config.prompt_template}` not found"
            )
        return load_template(project.config.prompt_template)
    if project.config.generator in RASA_GENERATOR_SYNTAX and installed_rasa_folder() is not None:
        name = rasa_default_template_name(project.config.generator, project.config.llm, bool(project.agents))
        log.info(
            "%s: no prompt_template; using Rasa Pro's %s for this generator and model, as Rasa does",
            project.config.generator_where,
            name,
        )
        return rasa_template(name)
    return None


# ---------------------------------------------------------------------------------------------- the user's Rasa

RASA_TEMPLATE_PREFIX = "rasa:"
RASA_GENERATOR_SYNTAX = {
    "SingleStepLLMCommandGenerator": Syntax.V1,
    "CompactLLMCommandGenerator": Syntax.V2,
    "SearchReadyLLMCommandGenerator": Syntax.V3,
}
_RASA_TEMPLATE_FOLDERS = (
    "dialogue_understanding/generator/prompt_templates",
    "dialogue_understanding/generator/single_step",
)
# Which template Rasa Pro 3.21 picks by `provider/model` (file-name stems: facts of its model-to-template table).
_RASA_MODEL_TEMPLATES = {
    "openai/gpt-4o-2024-11-20": "gpt_4o_2024_11_20",
    "azure/gpt-4o-2024-11-20": "gpt_4o_2024_11_20",
    "openai/gpt-5.1-2025-11-13": "gpt_5_1_2025_11_13",
    "azure/gpt-5.1-2025-11-13": "gpt_5_1_2025_11_13",
    "openai/gpt-5.2-2025-12-11": "gpt_5_2_2025_12_11",
    "azure/gpt-5.2-2025-12-11": "gpt_5_2_2025_12_11",
    "anthropic/claude-3-5-sonnet-20240620": "claude_3_5_sonnet_20240620",
    "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0": "claude_3_5_sonnet_20240620",
    "anthropic/claude-sonnet-4-5-20250929": "claude_sonnet_4_5_20250929",
    "bedrock/anthropic.claude-sonnet-4-5-20250929-v1:0": "claude_sonnet_4_5_20250929",
    "anthropic/claude-sonnet-4-6": "claude_sonnet_4_5_20250929",
    "bedrock/anthropic.claude-sonnet-4-6": "claude_sonnet_4_5_20250929",
}
_RASA_FALLBACK_TEMPLATE = "gpt_5_1_2025_11_13"  # default and fallback (any other model, a finetuned one included)


def installed_rasa_folder() -> Path | None:
    """The folder of the installed `rasa` package (Rasa Pro), found without importing it; None when absent."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("rasa")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def rasa_default_template_name(generator: str, llm: dict[str, Any] | None, has_agents: bool) -> str:
    """The file name of the template Rasa Pro uses for `generator` and its `llm:` config when none is named."""
    if RASA_GENERATOR_SYNTAX[generator] is Syntax.V1:
        return "command_prompt_template.jinja2"
    config = dict(llm or {})
    if isinstance(config.get("models"), list) and config["models"]:
        config = dict(config["models"][0])
    provider, model = config.get("provider"), config.get("model")
    stem = _RASA_FALLBACK_TEMPLATE
    if model:
        full = str(model) if provider and str(provider) in str(model) else f"{provider}/{model}"
        stem = _RASA_MODEL_TEMPLATES.get(full, _RASA_FALLBACK_TEMPLATE)
    version = RASA_GENERATOR_SYNTAX[generator].value
    return f"{'agent_' if has_agents else ''}command_prompt_{version}_{stem}_template.jinja2"


def rasa_template(name: str) -> PromptTemplate:
    """The template `name` of the user's installed Rasa Pro, read at run time (recipe never ships it)."""
    folder = installed_rasa_folder()
    where = " or ".join(f"rasa/{sub}/" for sub in _RASA_TEMPLATE_FOLDERS)
    if folder is None:
        raise ConfigError(
            f"{RASA_TEMPLATE_PREFIX}{name}: Rasa Pro is not installed in this environment; pass the "
            f"file itself instead: --prompt-template path/to/{name} (in {where} of a Rasa Pro "
            "install)"
        )
    for sub in _RASA_TEMPLATE_FOLDERS:
        if (folder / sub / name).is_file():
            return load_template(folder / sub / name)
    raise ConfigError(
        f"{RASA_TEMPLATE_PREFIX}{name}: the installed Rasa Pro ({folder}) has no such template in "
        f"{where}; pass its file with --prompt-template FILE"
    )


# ---------------------------------------------------------------------------------------------- command lists

# Our templates' lines for commands that only some releases or projects have (the files hold the 3.21 set).
_HANDOFF_LINES = {
    Syntax.V1: "HumanHandoff(): the user wants a human",
    Syntax.V2: "hand over: the user asks for a human",
}
_LAST_COMMAND_LINE = {Syntax.V1: "RepeatLastBotMessages(): ", Syntax.V2: "repeat message: "}
_AGENT_LINES = {
    Syntax.V1: (
        "{% if active_agent %}\nContinueAgent(): the user answers the active agent "
        "{{ active_agent.name }}{% endif %}{% if completed_agents %}\nRestartAgent(agent_name): the user "
        "wants to redo a finished agent's task (finished: {{ completed_agents | map(attribute='name') | "
        "join(', ') }}){% endif %}"
    ),
    Syntax.V2: (
        "{% if active_agent %}\ncontinue agent: the user answers the active agent "
        "{{ active_agent.name }}{% endif %}{% if completed_agents %}\nrestart agent AGENT_NAME: the user "
        "wants to redo a finished agent's task (finished: {{ completed_agents | map(attribute='name') | "
        "join(', ') }}){% endif %}"
    ),
}


def command_list_for(text: str, project: Project, syntax: Syntax) -> str:
    """One of our templates with the command list of the target release and project: `hand over` before 3.16,
    agent commands (shown while an agent is active / after one finished) for projects with sub-agents on 3.14+,
    and a line for each custom command that has a description."""
    dialect = Syntax.V1 if syntax is Syntax.V1 else Syntax.V2
    lines = text.split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith(_LAST_COMMAND_LINE[dialect])), None)
    if at is None:
        return text
    before: list[str] = []
    after: list[str] = []
    if project.rasa_version < HANDOFF_REMOVED_IN:
        (after if dialect is Syntax.V1 else before).append(_HANDOFF_LINES[dialect])
    after += [line for spec in project.custom_commands if (line := spec.template_line(syntax))]
    agent_suffix = _AGENT_LINES[dialect] if project.agents and project.rasa_version >= AGENTS_ADDED_IN else ""
    if after:
        after[-1] += agent_suffix
    else:
        lines[at] += agent_suffix
    return "\n".join(lines[:at] + before + [lines[at]] + after + lines[at + 1 :])


def template_command_warnings(template: PromptTemplate, project: Project, syntax: Syntax) -> list[str]:
    """Commands a template offers that the target release drops, and custom commands it never mentions."""
    warnings = []
    if project.rasa_version >= HANDOFF_REMOVED_IN and any(w in template.text for w in ("hand over", "HumanHandoff(")):
        warnings.append(
            f"{template.path} offers the handoff command, which Rasa Pro {project.rasa_version} no "
            f"longer parses (removed in {HANDOFF_REMOVED_IN}); remove it or pass --rasa-version"
        )
    for spec in project.custom_commands:
        first_word = spec.form(syntax).split("{")[0].split("(")[0].strip()
        if first_word and first_word not in template.text:
            warnings.append(f"{template.path} never mentions the custom command `{spec.name}` (`{spec.form(syntax)}`)")
    return warnings


def choose_syntax(project: Project, explicit: str | None = None) -> Syntax:
    """`--command-syntax` wins, then the command generator named in config.yml, then v2."""
    if explicit:
        try:
            return Syntax(explicit)
        except ValueError:
            raise ConfigError(f"--command-syntax {explicit}: expected one of v1, v2, v3") from None
    if project.config.syntax is None and project.config.generator:
        log.warning(
            "%s: the command generator `%s` is the project's own and recipe cannot tell which syntax it "
            "parses; using v2 (`start flow x`). Pass --command-syntax v1|v2|v3 to choose",
            project.config.generator_where,
            project.config.generator,
        )
    return project.config.syntax or Syntax.V2


_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False)  # = json.dumps(value, ensure_ascii=False), built once


def _to_json_escaped_string(value: Any) -> str:
    return _JSON_ENCODER.encode(value)


def jinja_environment() -> jinja2.Environment:
    # As at runtime: autoescape off, no trim/lstrip, the template's final newline dropped, one custom filter.
    environment = jinja2.Environment(autoescape=False, undefined=jinja2.Undefined)
    environment.filters["to_json_escaped_string"] = _to_json_escaped_string
    return environment


# What the runtime passes to a command-generator template (Rasa Pro 3.21's single-step
# generators): `active_agent` and `completed_agents` only in projects with sub-agents (None / [] otherwise here).
COMMAND_PROMPT_VARIABLES = frozenset(
    {
        "available_flows",
        "current_conversation",
        "current_flow",
        "current_slot",
        "current_slot_description",
        "current_slot_type",
        "current_slot_allowed_values",
        "flow_slots",
        "user_message",
        "current_datetime",
        "active_agent",
        "completed_agents",
    }
)


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
            log.warning(
                "%s uses %s, which %s never set: %s render empty",
                template.path,
                ", ".join(f"`{name}`" for name in unknown),
                "the runtime and recipe",
                "it" if len(unknown) == 1 else "they",
            )

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


def _collect_steps(project: Project, flow: Flow) -> list[Step]:
    """Collect steps of a flow and of the flows it reaches through `call`, in step order (computed once per flow)."""
    cached = project.collect_steps_by_flow.get(flow.id)
    if cached is None or cached[0] is not flow:  # a flow replaced in project.flows is derived again
        cached = project.collect_steps_by_flow[flow.id] = (flow, _collect_steps_uncached(project, flow))
    return cached[1]


def _extractable(project: Project, step: Step, slots: dict[str, Any], asked_slot: str | None = None) -> bool:
    if step.collect not in project.domain.slots:
        return False
    return not step.ask_before_filling or slots.get(step.collect) is not None or step.collect == asked_slot


def _value_text(value: Any) -> str:
    return "undefined" if value is None else str(value)


def _buttons_text(buttons: tuple[Button, ...], version: RasaVersion) -> str:
    if version < HANDOFF_REMOVED_IN:  # before 3.16: every button, its title as written
        return ", ".join(f'button {i}: "{b.title}"' for i, b in enumerate(buttons, start=1))
    # 3.16+: newlines in titles become spaces, a button with an empty title is left out (the others keep their
    # position number: `button 1`, `button 3`)
    return ", ".join(
        f'button {i}: "{_one_line(b.title)}"' for i, b in enumerate(buttons, start=1) if _one_line(b.title or "")
    )


def transcript_lines(
    lines: tuple[TranscriptLine, ...] | list[TranscriptLine],
    *,
    version: RasaVersion = NEWEST_RASA_VERSION,
    highlight_agents: bool = False,
) -> list[str]:
    """`USER: ...` and `AI: ...` lines as the runtime writes them (buttons appended, empty bot messages left out).
    With `highlight_agents` (a project with sub-agents) a sub-agent's messages carry its name instead of `AI`."""
    rendered = []
    for line in lines:
        text = _one_line(line.text) if line.text else ""
        speaker = line.speaker
        if line.speaker == "AI":
            buttons = _buttons_text(line.buttons, version) if line.buttons else ""
            if buttons:
                text = f"{text} {buttons}" if text else buttons
            if not text:
                continue  # a bot message with neither text nor (titled) buttons is not shown
            if highlight_agents and line.agent:
                speaker = line.agent
        rendered.append(f"{speaker}: {text}")
    return rendered


def transcript_text(
    lines: tuple[TranscriptLine, ...] | list[TranscriptLine],
    user_message: str,
    *,
    version: RasaVersion = NEWEST_RASA_VERSION,
    highlight_agents: bool = False,
) -> str:
    """The last 20 lines of the conversation, then the new user message after a newline."""
    shown = transcript_lines(lines, version=version, highlight_agents=highlight_agents)
    history = "\n".join(shown[-TRANSCRIPT_LINES:])
    return f"{history}\nUSER: {_one_line(user_message)}"


def _one_line(text: str) -> str:
    return text.replace("\n", " ")  # as the runtime does: each newline becomes a space, nothing else changes


def prompt_variables(
    project: Project, state: DialogueState, user_message: str, current_datetime: datetime | None
) -> dict[str, Any]:
    """Every variable the runtime passes to the command generator's template."""
    slots = state.slots
    has_agents = bool(project.agents) and project.rasa_version >= AGENTS_ADDED_IN
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
        entry = {"name": flow.id, "description": flow.description, "slots": flow_slot_entries}
        agent_info = [
            _agent_entry(project, agent)
            for kind, agent, flow_id in state.agent_log
            if kind == "started" and flow_id == flow.id and agent in project.agents
        ]
        if agent_info and has_agents:
            entry["agent_info"] = agent_info  # one per start of an agent by this flow, as the runtime lists them
        available_flows.append(entry)

    current_flow = None
    for frame in reversed(state.stack):
        if frame.kind != "called" and frame.flow_id != "pattern_collect_information":
            current_flow = frame.flow_id
            break
    current_slot = current_slot_description = None
    if state.stack:
        top = state.stack[-1]
        top_flow = project.flows.get(top.flow_id)
        top_step = top_flow.steps.get(top.step_id) if top_flow else None
        if top_step is not None and top_step.kind == "collect":
            current_slot, current_slot_description = top_step.collect, top_step.description
    asked = project.domain.slots.get(current_slot) if current_slot else None

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
    variables: dict[str, Any] = {
        "available_flows": available_flows,
        "current_conversation": transcript_text(
            state.transcript, user_message, version=project.rasa_version, highlight_agents=has_agents
        ),
        "current_flow": current_flow,
        "current_slot": current_slot,
        "current_slot_description": current_slot_description,
        "current_slot_type": asked.type if asked is not None else None,
        "current_slot_allowed_values": _allowed_values(asked) if asked is not None else None,
        "flow_slots": flow_slots,
        "user_message": _one_line(user_message),
        "current_datetime": current_datetime,
    }
    if has_agents:
        variables["active_agent"] = (
            _agent_entry(project, state.active_agent[0])
            if state.active_agent is not None and state.active_agent[1] == current_flow
            else None
        )
        variables["completed_agents"] = _completed_agents(project, state)
    return variables


def _agent_entry(project: Project, agent: str) -> dict[str, str]:
    return {"name": agent, "description": project.agents[agent].description}


def _completed_agents(project: Project, state: DialogueState) -> list[dict[str, str]]:
    """Agents that completed in the top user flow and are not running again (the runtime collects them in a set:
    its order is arbitrary; ours is the order they first completed in)."""
    top = next((frame.flow_id for frame in reversed(state.stack) if frame.kind == "user"), None)
    if top is None:
        return []
    last: dict[str, str] = {}
    for kind, agent, _flow_id in state.agent_log:
        last[agent] = kind
    names = [agent for kind, agent, flow_id in state.agent_log if kind == "completed" and flow_id == top]
    return [
        _agent_entry(project, a) for a in dict.fromkeys(names) if last.get(a) == "completed" and a in project.agents
    ]


# ---------------------------------------------------------------------------------------------- date and time


def conversation_date_key(conversation_id: str) -> str:
    """What a test case's date is derived from: `<file name>::<test case>[#n]`, without the folders. prepare-data
    writes the split suites to another folder (and may re-root them), so a key with the path would give the
    validation suite other dates than `val.jsonl`; the file name and the test case's name survive every copy. Two
    test cases of one name in files of one name share a date, which only costs a little variety."""
    file, separator, name = conversation_id.partition("::")
    if not separator:
        return conversation_id
    return f"{PureWindowsPath(file).name}::{name}"  # splits at `/` and `\\` alike


def conversation_datetime(conversation_id: str, seed: int, mocked: Any = None) -> datetime:
    """A date for a conversation's prompts: the `mocked_datetime` fixture if set, else one derived from the seed.

    Never the wall clock: the same conversation gets the same date on every run, different conversations get
    varied dates (within 2025-2027) so the model does not learn one fixed day.
    """
    if mocked is not None:
        value = mocked if isinstance(mocked, datetime) else datetime.fromisoformat(str(mocked))
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    digest = hashlib.sha256(f"{seed}:{conversation_date_key(conversation_id)}".encode()).digest()
    rng = random.Random(digest)
    start = datetime(2025, 1, 1, tzinfo=UTC)
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
