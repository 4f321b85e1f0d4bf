"""The command language: one typed model for every command, printed and parsed in every dialect.

Dialects (as Rasa Pro's command generators write them):
  v1     `StartFlow(book_hotel)`, `SetSlot(city, Lisbon)`           (SingleStepLLMCommandGenerator)
  v2     `start flow book_hotel`, `set slot city Lisbon`             (CompactLLMCommandGenerator)
  v3     as v2, but knowledge is `search and reply`                  (SearchReadyLLMCommandGenerator)
  short  `start book_hotel`, `set city Lisbon`, `chat`, `search`     (seen in dialogue-understanding tests)

The syntax is always passed in explicitly; nothing here keeps state. Unlike the runtime parser we keep slot values
exactly (`C++` stays `C++`), reject trailing junk, and read one command per line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar


class Syntax(StrEnum):
    V1 = "v1"
    V2 = "v2"
    V3 = "v3"
    SHORT = "short"


ALL_SYNTAXES: tuple[Syntax, ...] = (Syntax.V1, Syntax.V2, Syntax.V3, Syntax.SHORT)

# Values the runtime reads as "no value" (= reset the slot).
_NONE_VALUES = {"none", "null", "undefined", "[missing]", "[missing information]", ""}


@dataclass(frozen=True)
class Command:
    """Base of all commands. `kind` is the command's name in JSON form (`{"command": kind, ...}`)."""

    kind: ClassVar[str] = ""

    def as_dict(self) -> dict:
        return {"command": self.kind}


@dataclass(frozen=True)
class StartFlow(Command):
    flow: str
    kind: ClassVar[str] = "start flow"

    def as_dict(self) -> dict:
        return {"command": self.kind, "flow": self.flow}


@dataclass(frozen=True)
class SetSlot(Command):
    slot: str
    value: str | None  # None resets the slot; values stay strings, typed when applied
    kind: ClassVar[str] = "set slot"

    def as_dict(self) -> dict:
        return {"command": self.kind, "name": self.slot, "value": self.value, "extractor": "LLM"}


@dataclass(frozen=True)
class CancelFlow(Command):
    kind: ClassVar[str] = "cancel flow"


@dataclass(frozen=True)
class Clarify(Command):
    options: tuple[str, ...]  # kept sorted, as the runtime sorts them
    kind: ClassVar[str] = "clarify"

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(sorted(dict.fromkeys(self.options))))

    def as_dict(self) -> dict:
        return {"command": self.kind, "options": list(self.options)}


@dataclass(frozen=True)
class ChitChat(Command):
    kind: ClassVar[str] = "chitchat"


@dataclass(frozen=True)
class Knowledge(Command):
    kind: ClassVar[str] = "knowledge"


@dataclass(frozen=True)
class SkipQuestion(Command):
    kind: ClassVar[str] = "skip question"


@dataclass(frozen=True)
class RepeatLastBotMessages(Command):
    kind: ClassVar[str] = "repeat"


@dataclass(frozen=True)
class HumanHandoff(Command):
    kind: ClassVar[str] = "human handoff"


@dataclass(frozen=True)
class CannotHandle(Command):
    kind: ClassVar[str] = "cannot handle"


@dataclass(frozen=True)
class ContinueAgent(Command):
    kind: ClassVar[str] = "continue agent"


@dataclass(frozen=True)
class RestartAgent(Command):
    agent: str
    kind: ClassVar[str] = "restart agent"

    def as_dict(self) -> dict:
        return {"command": self.kind, "agent_id": self.agent}


COMMAND_KINDS: tuple[str, ...] = (
    StartFlow.kind,
    SetSlot.kind,
    CancelFlow.kind,
    Clarify.kind,
    ChitChat.kind,
    Knowledge.kind,
    SkipQuestion.kind,
    RepeatLastBotMessages.kind,
    HumanHandoff.kind,
    CannotHandle.kind,
    ContinueAgent.kind,
    RestartAgent.kind,
)

# The kinds a bot builder's tests are expected to cover (agent commands are optional extras).
CORE_COMMAND_KINDS: tuple[str, ...] = COMMAND_KINDS[:10]


# ---------------------------------------------------------------------------------------------- Rasa versions


@dataclass(frozen=True, order=True)
class RasaVersion:
    """The Rasa Pro release a model is trained for: its command parser decides which commands exist."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


OLDEST_RASA_VERSION = RasaVersion(3, 10)
NEWEST_RASA_VERSION = RasaVersion(3, 21)  # the newest release whose parser we have checked
HANDOFF_REMOVED_IN = RasaVersion(3, 16)  # `hand over` / `HumanHandoff()` no longer parse: the line is dropped
AGENTS_ADDED_IN = RasaVersion(3, 14)  # `continue agent` / `restart agent`, `call:` to sub-agents and MCP tools


def parse_rasa_version(text: str) -> RasaVersion:
    """`3.21`, `3.21.0` or `3.21.0rc1` -> 3.21; a release outside 3.10..newest is refused with what is supported."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?(?:[a-z]+\d*)?\s*", str(text))
    if not match:
        raise ValueError(f"`{text}` is not a Rasa Pro version; expected e.g. {NEWEST_RASA_VERSION}")
    version = RasaVersion(int(match.group(1)), int(match.group(2)))
    if not OLDEST_RASA_VERSION <= version <= NEWEST_RASA_VERSION:
        raise ValueError(
            f"Rasa Pro {version} is not supported; expected {OLDEST_RASA_VERSION} to {NEWEST_RASA_VERSION}"
        )
    return version


def version_kinds(version: RasaVersion) -> frozenset[str]:
    """The command kinds the runtime's parser of `version` reads from an LLM's answer (`cannot handle` never is,
    but recipe's own abstention rows use it, and the runtime ends there when nothing parses)."""
    kinds = set(COMMAND_KINDS)
    if version >= HANDOFF_REMOVED_IN:
        kinds.discard(HumanHandoff.kind)
    if version < AGENTS_ADDED_IN:
        kinds -= {ContinueAgent.kind, RestartAgent.kind}
    return frozenset(kinds)


def unsupported_reason(command: Command, version: RasaVersion) -> str | None:
    """Why the runtime of `version` never sees `command` from the LLM (None when it does)."""
    if isinstance(command, CustomCommand) or command.kind in version_kinds(version):
        return None
    if command.kind == HumanHandoff.kind:
        return (
            f"`{command.kind}` is not a command in Rasa Pro {version} (removed in {HANDOFF_REMOVED_IN}: the "
            "runtime drops the line and the turn becomes `cannot handle`); pass --rasa-version 3.15 or older "
            "to train it"
        )
    return f"`{command.kind}` is not a command before Rasa Pro {AGENTS_ADDED_IN} (target: {version})"


# ---------------------------------------------------------------------------------------------- custom commands

_ARG_PATTERNS = {
    "flow": r"[A-Za-z0-9_-]+",
    "slot": r"[A-Za-z_][A-Za-z0-9_-]*",
    "agent": r"[A-Za-z0-9_-]+",
    "value": r".+?",
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class CustomCommandSpec:
    """A project's own command (a command class of the project, parsed through the generator's additional
    commands), declared in `custom_commands.yml`: its name, typed arguments and its form in each dialect."""

    name: str  # the JSON `command`, e.g. `check balance`
    arguments: tuple[tuple[str, str], ...]  # (argument, flow | slot | agent | value), in order
    forms: tuple[tuple[Syntax, str], ...]  # (dialect, `check balance {account}`)
    description: str | None = None  # what our templates' command lists say it is for

    def form(self, syntax: Syntax) -> str:
        forms = dict(self.forms)
        return forms.get(syntax) or forms.get(Syntax.V2) or forms[Syntax.V3]

    def template_line(self, syntax: Syntax) -> str | None:
        """The command-list line of our templates: `check balance ACCOUNT: ...` (v1: `CheckBalance(account): ...`)."""
        if not self.description:
            return None
        shown = _PLACEHOLDER.sub(lambda m: m.group(1) if syntax is Syntax.V1 else m.group(1).upper(), self.form(syntax))
        return f"{shown}: {self.description}"

    def regex(self, syntax: Syntax) -> re.Pattern[str]:
        form, parts, at = self.form(syntax), [], 0
        types = dict(self.arguments)
        for match in _PLACEHOLDER.finditer(form):
            parts.append(re.escape(form[at : match.start()]).replace(r"\ ", r"\s+"))
            parts.append(f"(?P<{match.group(1)}>{_ARG_PATTERNS[types[match.group(1)]]})")
            at = match.end()
        parts.append(re.escape(form[at:]).replace(r"\ ", r"\s+"))
        return re.compile("".join(parts))


@dataclass(frozen=True)
class CustomCommand(Command):
    """An instance of a project's own command: its spec and argument values."""

    spec: CustomCommandSpec = field(repr=False)
    values: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:  # type: ignore[override]  # the class attribute of the built-in commands, per spec here
        return self.spec.name

    def as_dict(self) -> dict:
        return {"command": self.spec.name, **dict(self.values)}


class CommandParseError(ValueError):
    """A line that is not a command in the expected syntax. The message says what was expected."""


# ---------------------------------------------------------------------------------------------- printing

# Commands without arguments, per dialect. Missing entries fall back to v2 (the short dialect has no word for them).
_BARE_WORDS: dict[Syntax, dict[type[Command], str]] = {
    Syntax.V1: {
        CancelFlow: "CancelFlow()",
        ChitChat: "ChitChat()",
        Knowledge: "SearchAndReply()",
        SkipQuestion: "SkipQuestion()",
        RepeatLastBotMessages: "RepeatLastBotMessages()",
        HumanHandoff: "HumanHandoff()",
        CannotHandle: "CannotHandle()",
        ContinueAgent: "ContinueAgent()",
    },
    Syntax.V2: {
        CancelFlow: "cancel flow",
        ChitChat: "offtopic reply",
        Knowledge: "provide info",
        SkipQuestion: "skip question",
        RepeatLastBotMessages: "repeat message",
        HumanHandoff: "hand over",
        CannotHandle: "cannot handle",
        ContinueAgent: "continue agent",
    },
    Syntax.SHORT: {CancelFlow: "cancel", ChitChat: "chat", Knowledge: "search", SkipQuestion: "skip"},
}
_BARE_WORDS[Syntax.V3] = {**_BARE_WORDS[Syntax.V2], Knowledge: "search and reply"}


def _value_text(value: str | None) -> str:
    return "None" if value is None else value


def format_command(command: Command, syntax: Syntax) -> str:
    """The canonical one-line form of `command` in `syntax`."""
    match command:
        case StartFlow(flow=flow):
            return {Syntax.V1: f"StartFlow({flow})", Syntax.SHORT: f"start {flow}"}.get(syntax, f"start flow {flow}")
        case SetSlot(slot=slot, value=value):
            text = _value_text(value)
            if syntax is Syntax.V1:
                return f"SetSlot({slot}, {text})"
            return f"set {slot} {text}" if syntax is Syntax.SHORT else f"set slot {slot} {text}"
        case Clarify(options=options):
            if syntax is Syntax.V1:
                return f"Clarify({', '.join(options)})"
            prefix = "clarify" if syntax is Syntax.SHORT else "disambiguate flows"
            return " ".join([prefix, *options])
        case RestartAgent(agent=agent):
            return f"RestartAgent({agent})" if syntax is Syntax.V1 else f"restart agent {agent}"
        case CustomCommand(spec=spec, values=values):
            return _PLACEHOLDER.sub(lambda m: dict(values)[m.group(1)], spec.form(syntax))
    words = _BARE_WORDS[syntax].get(type(command)) or _BARE_WORDS[Syntax.V2][type(command)]
    return words


def format_commands(commands: Iterable[Command], syntax: Syntax) -> str:
    """Commands one per line, no trailing newline: the completion a model is trained to produce."""
    return "\n".join(format_command(command, syntax) for command in commands)


# ---------------------------------------------------------------------------------------------- parsing

_FLOW_ID = r"[A-Za-z0-9_-]+"
_SLOT_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_QUOTES = "'\"`"

# What LLMs put around a command: bullets, numbering, markdown, quotes, backticks.
_LEADING_JUNK = re.compile(r"^(?:\s|[-*•>#+]|\d+[.)]|\(\d+\)|[" + _QUOTES + "])+")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        return text[1:-1].strip()
    return text


def _slot_value(text: str) -> str | None:
    value = _unquote(text)
    return None if value.lower() in _NONE_VALUES else value


def _identifier(text: str, pattern: str, what: str, line: str) -> str:
    name = _unquote(text)
    if not re.fullmatch(pattern, name):
        raise CommandParseError(f"`{line}`: {what} `{name}` is not a valid identifier")
    return name


def _options(text: str, line: str) -> tuple[str, ...]:
    names = [name for name in re.split(r"[,\s]+", text.strip()) if name]
    return tuple(_identifier(name, _FLOW_ID, "flow", line) for name in names)


def _parse_v1(line: str) -> Command | None:
    match = re.fullmatch(r"([A-Za-z]+)\s*\((.*)\)", line)
    if not match:
        return None
    name, inner = match.group(1), match.group(2).strip()
    if name == "StartFlow":
        return StartFlow(_identifier(inner, _FLOW_ID, "flow", line))
    if name == "SetSlot":
        slot, comma, value = inner.partition(",")
        if not comma:
            raise CommandParseError(f"`{line}`: expected SetSlot(slot_name, value)")
        return SetSlot(_identifier(slot, _SLOT_NAME, "slot", line), _slot_value(value))
    if name == "Clarify":
        return Clarify(_options(inner, line))
    if name == "RestartAgent":
        return RestartAgent(_identifier(inner, _FLOW_ID, "agent", line))
    bare = {text[:-2]: cls for cls, text in _BARE_WORDS[Syntax.V1].items()}
    if name in bare:
        if inner:
            raise CommandParseError(f"`{line}`: {name}() takes no arguments")
        return bare[name]()
    return None


def _parse_words(line: str, syntax: Syntax) -> Command | None:
    """v2, v3 and the short dialect: keyword phrases (case-sensitive, as at runtime) with arguments."""
    words = line.split()
    text = " ".join(words)  # extra spaces are harmless
    start: tuple[str, ...]
    set_: tuple[str, ...]
    clarify: tuple[str, ...]
    if syntax is Syntax.SHORT:
        start, set_, clarify = ("start",), ("set",), ("clarify",)
    else:
        start, set_, clarify = ("start", "flow"), ("set", "slot"), ("disambiguate", "flows")

    def has_prefix(prefix: tuple[str, ...]) -> bool:
        return tuple(words[: len(prefix)]) == prefix

    if has_prefix(start):
        rest = words[len(start) :]
        if len(rest) != 1:
            raise CommandParseError(f"`{line}`: expected `{' '.join(start)} <flow_id>`")
        return StartFlow(_identifier(rest[0], _FLOW_ID, "flow", line))
    if has_prefix(set_):
        rest = words[len(set_) :]
        if not rest:
            raise CommandParseError(f"`{line}`: expected `{' '.join(set_)} <slot_name> <value>`")
        # The value is everything after the slot name, spaces included (`set slot city New York`).
        value = text.split(" ", len(set_) + 1)[len(set_) + 1] if len(rest) > 1 else ""
        return SetSlot(_identifier(rest[0], _SLOT_NAME, "slot", line), _slot_value(value))
    if has_prefix(clarify):
        return Clarify(_options(" ".join(words[len(clarify) :]), line))
    if has_prefix(("restart", "agent")) and len(words) == 3:
        return RestartAgent(_identifier(words[2], _FLOW_ID, "agent", line))
    bare = {phrase: cls for cls, phrase in _BARE_WORDS[syntax].items()}
    return bare[text]() if text in bare else None


def _clean_line(line: str) -> str:
    line = _LEADING_JUNK.sub("", line.strip())
    # A trailing quote is wrapping (or stray) only while it has no partner in the line; a balanced one closes a
    # quoted value (`set slot city "New York"`) and must stay for the value to be unquoted whole.
    while line and line[-1] in _QUOTES and line.count(line[-1]) % 2 == 1:
        line = line[:-1].rstrip()
    return line


def _parse_custom(line: str, syntax: Syntax, custom: Iterable[CustomCommandSpec]) -> Command | None:
    text = " ".join(line.split())
    for spec in custom:
        match = spec.regex(syntax).fullmatch(text)
        if match:
            values = tuple((name, _unquote(match.group(name))) for name, _ in spec.arguments)
            return CustomCommand(spec=spec, values=values)
    return None


def parse_command(
    line: str, syntaxes: Iterable[Syntax] = ALL_SYNTAXES, custom: Iterable[CustomCommandSpec] = ()
) -> Command:
    """Parse one command line in any of `syntaxes` (built-in commands first, then the project's `custom` ones, as
    the runtime tries its default commands before the additional ones); raise CommandParseError saying what was
    expected."""
    cleaned = _clean_line(line)
    if not cleaned:
        raise CommandParseError("empty command")
    allowed = tuple(syntaxes)
    custom = tuple(custom)
    for syntax in allowed:
        command = _parse_v1(cleaned) if syntax is Syntax.V1 else _parse_words(cleaned, syntax)
        if command is None and custom:
            command = _parse_custom(cleaned, syntax, custom)
        if command is not None:
            return command
    examples = ", ".join(dict.fromkeys(f"`{format_command(StartFlow('flow_id'), s)}`" for s in allowed))
    names = "/".join(s.value for s in allowed)
    raise CommandParseError(f"`{line.strip()}` is not a command in {names} syntax (expected e.g. {examples})")


def detect_syntax(line: str) -> Syntax | None:
    """Which dialect a single command line is written in (None if it parses in none)."""
    for syntax in (Syntax.V1, Syntax.V3, Syntax.V2, Syntax.SHORT):
        try:
            command = parse_command(line, (syntax,))
        except CommandParseError:
            continue
        # `provide info` is v2; `search and reply` is v3; everything else written the v2 way is v2.
        if syntax is Syntax.V3 and not isinstance(command, Knowledge):
            return Syntax.V2
        return syntax
    return None


@dataclass(frozen=True)
class ParsedOutput:
    """What a model's answer parsed into: the commands, and the lines that were not commands."""

    commands: tuple[Command, ...]
    unparsed_lines: tuple[str, ...]

    @property
    def fully_parsed(self) -> bool:
        return not self.unparsed_lines


def parse_model_output(
    text: str, syntax: Syntax, version: RasaVersion | None = None, custom: Iterable[CustomCommandSpec] = ()
) -> ParsedOutput:
    """Parse an LLM's answer line by line in one syntax. Blank lines and code fences are ignored. With `version`, a
    command that release's parser does not know (`hand over` from 3.16 on) is an unparsed line, as the runtime drops
    it."""
    commands: list[Command] = []
    unparsed: list[str] = []
    custom = tuple(custom)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("```"):
            continue
        try:
            command = parse_command(line, _compatible(syntax), custom)
        except CommandParseError:
            unparsed.append(line)
            continue
        if version is not None and unsupported_reason(command, version):
            unparsed.append(line)
        else:
            commands.append(command)
    return ParsedOutput(tuple(commands), tuple(unparsed))


def _compatible(syntax: Syntax) -> tuple[Syntax, ...]:
    # v3 parses every v2 phrase too (the runtime parser does), and v2 accepts v3's `search and reply`.
    if syntax in (Syntax.V2, Syntax.V3):
        return (syntax, Syntax.V3 if syntax is Syntax.V2 else Syntax.V2)
    return (syntax,)


# ---------------------------------------------------------------------------------------------- comparing


def _normal_value(value: str | None) -> str | None:
    return None if value is None else " ".join(value.split()).casefold()


def command_key(
    command: Command,
    *,
    with_values: bool = True,
    normalize: Callable[[str | None], str | None] = _normal_value,
    float_slots: frozenset[str] = frozenset(),
) -> tuple:
    """What makes two commands equal: flow id, option list, agent, slot name and normalised value (the one comparison
    behind validation, evaluation and deduplication). `with_values=False` compares slot names only; `normalize`
    folds values (default: case and spaces; validation folds number words and currencies too); a slot in
    `float_slots` compares its value as a number (`3` == `3.0`), as the runtime stores it."""
    match command:
        case StartFlow(flow=flow):
            return (command.kind, flow)
        case SetSlot(slot=slot, value=value):
            if not with_values:
                return (command.kind, slot)
            if slot in float_slots and value is not None:
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if math.isfinite(number):
                    return (command.kind, slot, number)
            return (command.kind, slot, normalize(value))
        case Clarify(options=options):
            return (command.kind, options)
        case RestartAgent(agent=agent):
            return (command.kind, agent)
        case CustomCommand(values=values):
            return (
                (command.kind, tuple((name, normalize(value)) for name, value in values))
                if with_values
                else (command.kind,)
            )
    return (command.kind,)
