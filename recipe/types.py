"""The shared types of the pipeline: the assistant (flows, domain) and its tests, as read from the user's files.

Readers validate at the edge and build these; everything downstream trusts them. Every object remembers where it
came from (`Location`) so later stages can still point at `path:line`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.commands import Command, Syntax

END = "END"


@dataclass(frozen=True)
class Location:
    path: str
    line: int | None = None

    def __str__(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


# ---------------------------------------------------------------------------------------------- flows


@dataclass(frozen=True)
class Branch:
    """One arm of a `next:` list: go to `target` (a step id or END) when `condition` holds (None = else/always)."""

    condition: str | None
    target: str


@dataclass
class Step:
    id: str
    kind: str  # collect | action | set_slots | link | call | noop
    next: list[Branch]  # resolved: always at least one branch, the last one unconditional
    location: Location
    collect: str | None = None
    description: str | None = None
    ask_before_filling: bool = False
    reset_after_flow_ends: bool = True
    utter: str | None = None  # collect: the question to ask instead of utter_ask_<slot>
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (condition, utter)
    action: str | None = None
    set_slots: list[tuple[str, Any]] = field(default_factory=list)
    link: str | None = None
    call: str | None = None  # a flow, a sub-agent (3.14+) or, with `mcp_server`, an MCP tool
    mcp_server: str | None = None
    mapping: dict[str, Any] | None = None  # MCP tool: `input:` / `output:` slot mappings
    exit_if: list[str] = field(default_factory=list)  # sub-agent: slot conditions that end it


@dataclass
class Flow:
    id: str
    description: str
    name: str | None
    guard: str | None  # the `if:` condition; "False" means reachable only through link/call
    always_include_in_prompt: bool
    persisted_slots: list[str]
    run_pattern_completed: bool  # say the completion pattern when this flow ends the conversation's last flow
    nlu_triggers: list[str]  # intents that start the flow (button payloads like `/book_hotel`)
    steps: dict[str, Step]  # in definition order (nested branch steps included)
    first_step: str
    location: Location

    @property
    def is_pattern(self) -> bool:
        return self.id.startswith("pattern_")

    def collect_steps(self) -> list[Step]:
        return [step for step in self.steps.values() if step.kind == "collect"]


# ---------------------------------------------------------------------------------------------- domain


@dataclass(frozen=True)
class Slot:
    name: str
    type: str  # text | bool | categorical | float | any | list
    values: tuple[str, ...] = ()  # categorical values, `__other__` excluded
    mappings: tuple[str, ...] = ()
    initial_value: Any = None
    location: Location | None = None

    @property
    def llm_fillable(self) -> bool:
        """May the command generator set it? (no mappings at all defaults to from_llm in CALM)"""
        return not self.mappings or "from_llm" in self.mappings


@dataclass(frozen=True)
class Button:
    title: str
    payload: str


@dataclass(frozen=True)
class ResponseVariation:
    text: str | None
    buttons: tuple[Button, ...] = ()
    # `condition:` as written: a pypred string over `slots.`, or (deprecated) a list of {type: slot, name, value}
    condition: str | tuple[tuple[str, Any], ...] | None = None
    channel: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_jinja(self) -> bool:
        """`metadata: {template: jinja}`: the text is a Jinja2 template, not `{slot}` placeholders."""
        return str(self.metadata.get("template", "")).lower() == "jinja"


@dataclass
class Domain:
    slots: dict[str, Slot]
    responses: dict[str, list[ResponseVariation]]
    actions: set[str]
    files: list[str]


# ---------------------------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class Assertion:
    """One entry of a user step's `assertions:` list; `data` is the plain mapping under the assertion's key."""

    kind: str
    data: Any
    location: Location


@dataclass
class UserStep:
    text: str
    location: Location
    commands: list[Command] | None = None  # None: the test gives no commands for this turn
    # Commands of the turn that the LLM command generator never produces (set slot on a slot without a from_llm
    # mapping): DU tests list every command source's output, NLU's included. They change the state, train nothing.
    nlu_commands: list[Command] = field(default_factory=list)
    syntax: Syntax | None = None  # dialect the commands were written in
    assertions: list[Assertion] = field(default_factory=list)
    metadata: str | None = None


@dataclass
class BotStep:
    location: Location
    utter: str | None = None
    text: str | None = None


@dataclass
class SlotCheckStep:
    """A classic-format `slot_was_set` / `slot_was_not_set` step: (slot, value or NO_VALUE)."""

    location: Location
    was_set: bool
    slots: list[tuple[str, Any]]


class _NoValue:
    """A slot check that names the slot without a value. One instance, with a stable repr (keys of cached results
    are built from test cases' reprs) that survives pickling as itself (`is NO_VALUE` holds after a cache hit)."""

    _instance: _NoValue | None = None

    def __new__(cls) -> _NoValue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_VALUE"

    def __reduce__(self) -> str:
        return "NO_VALUE"


NO_VALUE = _NoValue()

TestStep = UserStep | BotStep | SlotCheckStep


@dataclass(frozen=True)
class Stub:
    """A stubbed custom action: the slot events it returns and the responses it sends."""

    events: tuple[tuple[str, Any], ...]  # (slot name, value)
    responses: tuple[str, ...]


@dataclass
class TestCase:
    name: str
    file: str  # path as given (relative to where the user pointed us)
    location: Location
    steps: list[TestStep]
    fixture_slots: list[tuple[str, Any]]  # resolved from the test's fixtures, in order
    metadata: dict[str, Any]
    stubs: dict[str, Stub]  # action name -> stub, test-case specific ones already applied
    project_file: str = ""  # the file relative to the project root (when below it): ids do not depend on the cwd
    index: int = 0  # position in the file's `test_cases` list
    occurrence: int = 1  # Rasa runs every test case of a name; the second one of a name in a file is 2, ...

    __test__ = False  # not a pytest class

    @property
    def id(self) -> str:
        """`<file>::<name>`, the file relative to the project root, so that ids (and what is derived from them,
        such as prompt dates) are the same whichever folder the command runs from; a repeated name gets `#2`..."""
        suffix = f"#{self.occurrence}" if self.occurrence > 1 else ""
        return f"{self.project_file or self.file}::{self.name}{suffix}"

    @property
    def user_steps(self) -> list[UserStep]:
        return [step for step in self.steps if isinstance(step, UserStep)]


@dataclass
class TestFile:
    path: str
    test_cases: list[TestCase]
    raw: Any  # the plain YAML content, kept so split suites can be written back like the input

    __test__ = False


def relative(path: Path, root: Path | None = None) -> str:
    """A path as the user would like to read it: relative to `root` (or the cwd) when below it."""
    try:
        base = (root or Path.cwd()).resolve()
        return str(path.resolve().relative_to(base))
    except (ValueError, RuntimeError, OSError):  # not below it, or a symlink loop: the path as given
        return str(path)
