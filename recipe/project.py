"""Finding and reading an assistant project laid out the way Rasa Pro projects are.

Flows: every YAML file with a top-level `flows:` key under `flows/` or `data/` (nested folders included).
Domain: `domain.yml`, a `domain/` tree, or a `domain.yml` beside the flows. Config: `config.yml`, whose command
generator decides the default command syntax and whose `prompt_template` the default template.
"""

from __future__ import annotations

import ast
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recipe.agents import Agent, read_agents, read_custom_commands, read_mcp_servers
from recipe.commands import (
    NEWEST_RASA_VERSION,
    Clarify,
    Command,
    ContinueAgent,
    CustomCommand,
    CustomCommandSpec,
    RasaVersion,
    RestartAgent,
    SetSlot,
    StartFlow,
    Syntax,
    unsupported_reason,
)
from recipe.conditions import ConditionError, parse_condition
from recipe.domain import BUILTIN_SLOTS, read_domain
from recipe.errors import InputError, Problems
from recipe.flows import read_flows_file
from recipe.types import Domain, Flow, Slot, relative
from recipe.yamlio import line_of, load_yaml, plain

if TYPE_CHECKING:
    from recipe.retrieval import FlowRetrieval
    from recipe.tracker import ActionRunner

log = logging.getLogger("recipe")

GENERATOR_SYNTAX = {
    "SingleStepLLMCommandGenerator": Syntax.V1,
    "LLMCommandGenerator": Syntax.V1,
    "CompactLLMCommandGenerator": Syntax.V2,
    "SearchReadyLLMCommandGenerator": Syntax.V3,
}

# Generators that are not single-step: their prompts are not ours to reproduce.
_OTHER_GENERATORS = {"MultiStepLLMCommandGenerator", "NLUCommandAdapter"}

# Conversation patterns every CALM assistant has; a project may override them in its flows.
BUILTIN_PATTERNS = (
    "pattern_cancel_flow",
    "pattern_cannot_handle",
    "pattern_chitchat",
    "pattern_clarification",
    "pattern_code_change",
    "pattern_collect_information",
    "pattern_completed",
    "pattern_continue_interrupted",
    "pattern_correction",
    "pattern_human_handoff",
    "pattern_internal_error",
    "pattern_repeat_bot_messages",
    "pattern_restart",
    "pattern_search",
    "pattern_session_start",
    "pattern_skip_question",
    "pattern_user_silence",
)


@dataclass(frozen=True)
class AssistantConfig:
    """What `config.yml` says about the command generator."""

    generator: str | None = None
    syntax: Syntax | None = None
    prompt_template: Path | None = None
    prompt_template_where: str | None = None  # `config.yml:LINE`, for an error when the file is needed but missing
    include_date_time: bool | None = None
    path: str | None = None
    generator_where: str | None = None  # `config.yml:LINE` of the generator component
    llm: dict[str, Any] | None = None  # the generator's `llm:` block (picks Rasa's default template by model)


@dataclass
class Project:
    root: Path
    flows: dict[str, Flow]  # file order; user flows and the project's own pattern overrides
    domain: Domain
    config: AssistantConfig = field(default_factory=AssistantConfig)
    flow_files: list[str] = field(default_factory=list)
    # The assistant's running parts, when the user points us at them: custom actions run there for real.
    action_server: ActionRunner | None = None
    # Flow retrieval as at runtime (recipe/retrieval.py); None lists every startable flow in file order.
    flow_retrieval: FlowRetrieval | None = None
    # The Rasa Pro release the data is for: its parser decides which commands exist (`--rasa-version`).
    rasa_version: RasaVersion = NEWEST_RASA_VERSION
    agents: dict[str, Agent] = field(default_factory=dict)  # sub_agents/ (3.14+), by name
    mcp_servers: dict[str, str] = field(default_factory=dict)  # endpoints.yml `mcp_servers`: name -> url
    custom_commands: tuple[CustomCommandSpec, ...] = ()  # custom_commands.yml
    # Derived once per flow and kept with the project (not in a module global that would keep every project alive):
    # flow id -> (the flow, the collect steps its prompt lists) (recipe.prompt). init=False: a copy made with
    # dataclasses.replace starts empty.
    collect_steps_by_flow: dict[str, tuple[Flow, list]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def user_flows(self) -> list[Flow]:
        return [flow for flow in self.flows.values() if not flow.is_pattern]

    def slot(self, name: str) -> Slot | None:
        return self.domain.slots.get(name) or BUILTIN_SLOTS.get(name)

    def is_known_flow(self, flow_id: str) -> bool:
        return flow_id in self.flows or flow_id in BUILTIN_PATTERNS


def _yaml_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


def _find_domain_files(root: Path, flow_files: list[Path]) -> list[Path]:
    for candidate in (root / "domain.yml", root / "domain.yaml"):
        if candidate.is_file():
            return [candidate]
    if (root / "domain").is_dir():
        return _yaml_files(root / "domain")
    beside: list[Path] = []
    for folder in sorted({path.parent for path in flow_files}):
        for name in ("domain.yml", "domain.yaml"):
            if (folder / name).is_file():
                beside.append(folder / name)
        if (folder / "domain").is_dir():
            beside.extend(_yaml_files(folder / "domain"))
    return beside


def _base_generator(root: Path, dotted: str, depth: int = 0) -> str | None:
    """The known command generator a project's own generator class derives from, read from its source (never
    imported: the user's code may need packages we do not have). `custom.gen.MyGenerator` -> custom/gen.py."""
    module, _, class_name = dotted.rpartition(".")
    source = root / Path(*module.split(".")).with_suffix(".py") if module else None
    if source is None or not source.is_file() or depth > 5:
        return None
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return None
    imported = {
        alias.asname or alias.name: f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for base in node.bases:
                name = ast.unparse(base).rpartition(".")[2]
                if name in GENERATOR_SYNTAX:
                    return name
                origin = imported.get(name)
                found = (
                    _base_generator(root, origin, depth + 1)
                    if origin
                    else _base_generator(root, f"{module}.{name}", depth + 1)
                )
                if found:
                    return found
    return None


def read_config(root: Path) -> AssistantConfig:
    path = root / "config.yml"
    if not path.is_file():
        return AssistantConfig()
    shown = relative(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        return AssistantConfig(path=shown)
    for component in data.get("pipeline") or []:
        if not isinstance(component, dict):
            continue
        name = str(component.get("name", ""))
        known = name if name in GENERATOR_SYNTAX else None
        if known is None and "." in name:
            # A project's own component (`custom.my_gen.MyCommandGenerator`): a generator takes its base's syntax.
            known = _base_generator(root, name)
            is_generator = name.endswith("CommandGenerator") and name.rpartition(".")[2] not in _OTHER_GENERATORS
            if known is None and is_generator:
                # Its syntax is unknown: `choose_syntax` warns unless --command-syntax says it.
                return AssistantConfig(
                    generator=name,
                    path=shown,
                    generator_where=f"{shown}:{line_of(component)}",
                    **_template_settings(root, shown, component),
                )
            if known is not None:
                log.info("%s: `%s` derives from %s", shown, name, known)
        if known is None:
            if name.endswith("CommandGenerator"):
                log.warning(
                    "%s:%s: `%s` is not a single-step command generator (%s); recipe uses v2 commands "
                    "unless --command-syntax says otherwise",
                    shown,
                    line_of(component),
                    name,
                    ", ".join(GENERATOR_SYNTAX),
                )
            continue
        return AssistantConfig(
            generator=name,
            syntax=GENERATOR_SYNTAX[known],
            path=shown,
            generator_where=f"{shown}:{line_of(component)}",
            **_template_settings(root, shown, component),
        )
    return AssistantConfig(path=shown)


def _template_settings(root: Path, shown: str, component: dict[str, Any]) -> dict[str, Any]:
    template = component.get("prompt_template")
    include = component.get("include_date_time")
    # A missing template file is an error only where a prompt is rendered (coverage does not need it).
    return {
        "prompt_template": (root / str(template)).resolve() if template else None,
        "prompt_template_where": f"{shown}:{line_of(component, 'prompt_template')}" if template else None,
        "include_date_time": None if include is None else bool(include),
        "llm": plain(component["llm"]) if isinstance(component.get("llm"), dict) else None,
    }


def load_project(
    root: Path | str = ".",
    flows: list[Path] | None = None,
    domain: list[Path] | None = None,
) -> Project:
    """Read the assistant at `root`; `flows`/`domain` (files or folders) replace discovery when given."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(str(root), None, "project folder not found; expected a folder with flows and a domain")
    flow_roots = flows if flows else [root / "flows", root / "data"]
    candidates = [file for base in flow_roots if base.exists() for file in _yaml_files(base)]
    for base in flows or []:
        if not base.exists():
            raise InputError(str(base), None, "flows path not found")

    # Every file is read before anything is reported: one run shows every mistake (see errors.InputErrors).
    problems = Problems()
    loaded: dict[str, Flow] = {}
    flow_files: list[Path] = []
    for path in candidates:
        data = None
        with problems.catch():
            data = load_yaml(path)
        if not isinstance(data, dict) or "flows" not in data:
            continue
        flow_files.append(path)
        flows_in_file: list[Flow] = []
        with problems.catch():
            flows_in_file = read_flows_file(path, data, relative(path), problems)
        for flow in flows_in_file:
            if flow.id in loaded:
                # Rasa Pro 3.21 refuses duplicate flow ids across files (older releases kept the first).
                problems.add(
                    InputError(
                        flow.location.path,
                        flow.location.line,
                        f"flow `{flow.id}` is already defined at {loaded[flow.id].location}; flow ids must be unique",
                    )
                )
                continue
            loaded[flow.id] = flow
    if not loaded and problems.errors:
        problems.raise_if_any()
    if not loaded:
        # One path before the colon, like every other error: the --flows path, else the project folder.
        searched = " or ".join(str(p) for p in flow_roots)
        raise InputError(
            str(flows[0] if flows and len(flows) == 1 else root),
            None,
            f"no flows found in {searched}; expected YAML files with a top-level `flows:` key",
        )

    domain_files = []
    for path in domain or []:
        if not path.exists():
            raise InputError(str(path), None, "domain path not found")
        domain_files.extend(_yaml_files(path))
    if not domain:
        domain_files = _find_domain_files(root, flow_files)
    if not domain_files:
        problems.add(
            InputError(
                str(root),
                None,
                "no domain found; expected domain.yml, a domain/ folder, a domain.yml beside the flows, "
                "or --domain PATH",
            )
        )
        problems.raise_if_any()
    project = Project(
        root=root,
        flows=loaded,
        domain=read_domain(domain_files, {p: relative(p) for p in domain_files}, problems),
        config=read_config(root),
        flow_files=[relative(p) for p in flow_files],
        agents=read_agents(root, problems),
        mcp_servers=read_mcp_servers(root, problems),
        custom_commands=read_custom_commands(root, problems),
    )
    # Cross-file checks only on files that read cleanly: a slot missing from a broken domain file is no news.
    problems.raise_if_any()
    for error in project_problems(project):
        problems.add(error)
    problems.raise_if_any()
    return project


def project_problems(project: Project) -> list[InputError]:
    """Cross-file mistakes: collected slots exist, link/call targets exist, conditions parse."""
    found: list[InputError] = []
    for flow in project.flows.values():
        conditions: list[tuple[str, Any]] = [(flow.guard, flow.location)] if flow.guard else []
        for step in flow.steps.values():
            where = step.location
            if step.collect and project.slot(step.collect) is None:
                found.append(
                    InputError(
                        where.path,
                        where.line,
                        f"flow `{flow.id}` collects `{step.collect}`, which is not a slot in the domain",
                    )
                )
            for slot, _ in step.set_slots:
                if project.slot(slot) is None:
                    found.append(InputError(where.path, where.line, f"flow `{flow.id}` sets unknown slot `{slot}`"))
            target = step.link or step.call
            if step.kind == "call" and step.mcp_server is not None:
                if step.mcp_server not in project.mcp_servers:
                    found.append(
                        InputError(
                            where.path,
                            where.line,
                            f"flow `{flow.id}` calls tool `{step.call}` of MCP "
                            f"server `{step.mcp_server}`, which endpoints.yml's `mcp_servers` does not "
                            "list",
                        )
                    )
            elif step.kind == "call" and target in project.agents:
                pass  # a sub-agent (sub_agents/<agent>/config.yml)
            elif target and not project.is_known_flow(target):
                also = ", a sub-agent in sub_agents/ or an MCP tool (with `mcp_server:`)" if step.kind == "call" else ""
                found.append(
                    InputError(
                        where.path,
                        where.line,
                        f"flow `{flow.id}` {step.kind}s unknown flow `{target}`; expected a flow{also}",
                    )
                )
            conditions += [(branch.condition, where) for branch in step.next if branch.condition]
            conditions += [(condition, where) for condition, _ in step.rejections]
        for condition, where in conditions:
            if "{{" in condition:
                continue  # a Jinja condition (pattern overrides: `slots.{{context.collect}}`) is rendered first
            try:
                parse_condition(condition)
            except ConditionError as error:
                found.append(InputError(where.path, where.line, f"flow `{flow.id}`: {error}"))
    return found


def canonical_command(command: Command, project: Project) -> Command:
    """A valid command in the form the runtime ends up with: categorical and bool values spelled as the domain
    spells them, and a clarification with one option turned into starting that flow."""
    match command:
        case SetSlot(slot=name, value=value) if value is not None:
            slot = project.slot(name)
            canonical = canonical_slot_value(slot, value) if slot is not None else None
            if canonical is not None and slot is not None and slot.type in ("categorical", "bool"):
                return SetSlot(name, canonical)
        case Clarify(options=(only,)):
            return StartFlow(only)
    return command


def canonical_slot_value(slot: Slot, value: str) -> str | None:
    """The value as the domain spells it, or None when the slot's type cannot hold it."""
    if slot.type == "categorical":
        for allowed in slot.values:
            if allowed.casefold() == value.strip().casefold():
                return allowed
        return None
    if slot.type == "bool":
        lowered = value.strip().lower()
        return {"true": "True", "false": "False"}.get(lowered)
    if slot.type == "float":
        try:
            float(value)
        except ValueError:
            return None
    return value


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean `{match[0]}`?)" if match else ""


def command_problem(command: Command, project: Project, *, from_any_source: bool = False) -> str | None:
    """Why `command` cannot be right for this assistant (None when it can).

    With `from_any_source` the command is one a test lists, which may come from any command source (NLU, buttons)
    and may propose a value the assistant is meant to reject: both are valid there (the runtime applies them, and
    its slot-rejection step resets an out-of-range value). For an LLM's answer they are mistakes."""
    match command:
        case StartFlow(flow=flow):
            startable = [f.id for f in project.user_flows if (f.guard or "").strip().lower() != "false"]
            if flow not in project.flows or project.flows[flow].is_pattern:
                return f"unknown flow `{flow}`{_closest(flow, startable)}; expected one of: {', '.join(startable)}"
            if flow not in startable:
                return f"flow `{flow}` is reached only through a link or call (`if: False`), never by a command"
        case SetSlot(slot=name, value=value):
            slot = project.slot(name)
            if slot is None:
                return (
                    f"unknown slot `{name}`{_closest(name, list(project.domain.slots))}; expected a slot of the domain"
                )
            if from_any_source:
                return None
            if not slot.llm_fillable:
                return (
                    f"slot `{name}` is not filled by the command generator (mappings: {', '.join(slot.mappings)}); "
                    "the runtime drops such commands"
                )
            if value is not None and canonical_slot_value(slot, value) is None:
                if slot.type == "categorical":
                    return f"`{value}` is not a value of categorical slot `{name}`; expected one of: " + ", ".join(
                        slot.values
                    )
                return f"`{value}` is not a valid {slot.type} value for slot `{name}`"
        case Clarify(options=options):
            unknown = [flow for flow in options if flow not in project.flows or project.flows[flow].is_pattern]
            if unknown:
                return f"clarify names unknown flow `{unknown[0]}`"
        case RestartAgent(agent=agent) if agent not in project.agents:
            return f"unknown agent `{agent}`{_closest(agent, list(project.agents))}; expected an agent of sub_agents/"
        case ContinueAgent() if not project.agents:
            return "`continue agent` in a project without sub-agents (sub_agents/<agent>/config.yml)"
        case CustomCommand(spec=spec, values=values):
            for (name, kind), (_, value) in zip(spec.arguments, values):
                if kind == "flow" and (value not in project.flows or project.flows[value].is_pattern):
                    return f"`{spec.name}`: argument `{name}` names unknown flow `{value}`"
                if kind == "slot" and project.slot(value) is None:
                    return f"`{spec.name}`: argument `{name}` names unknown slot `{value}`"
                if kind == "agent" and value not in project.agents:
                    return f"`{spec.name}`: argument `{name}` names unknown agent `{value}`"
    # A test's command the target release no longer parses is read (and its turn left out, recipe.annotate).
    return None if from_any_source else unsupported_reason(command, project.rasa_version)
