"""The language of valid command answers for one assistant, as a regex and as a byte automaton for local decoding.

A model's answer is valid when every line is the canonical form (`format_command`) of a command this assistant can
act on: a user flow that can be started, a slot some flow collects and the command generator may fill, a value the
slot's type can hold (categorical values and booleans enumerated, numbers for float slots, one line of bounded free
text otherwise). `CommandGrammar` builds that language once from the project and gives it two ways:

* `regex`: the whole answer (one or more lines joined by `\\n`) for an endpoint's structured output, e.g. vLLM's
  `structured_outputs: {"regex": ...}`;
* `matcher()`: the same language as a lazily built DFA over UTF-8 bytes, for `recipe.decoding`, which walks it over a
  tokenizer's vocabulary to mask every token that would leave the language.

Both come from one syntax tree, so they cannot drift apart (the matcher reads characters beyond ASCII as well-formed
UTF-8 sequences, so bounds count characters in both). Lengths are bounded (free text, options, lines), which keeps
the language finite: with the token budget checked at every step, a constrained answer always ends complete.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recipe.commands import (
    CancelFlow,
    CannotHandle,
    ChitChat,
    Clarify,
    Command,
    ContinueAgent,
    CustomCommandSpec,
    HumanHandoff,
    Knowledge,
    RepeatLastBotMessages,
    RestartAgent,
    SetSlot,
    SkipQuestion,
    StartFlow,
    Syntax,
    format_command,
    version_kinds,
)
from recipe.errors import ConfigError
from recipe.project import Project

if TYPE_CHECKING:
    pass

# Commands without arguments that a command generator may answer with (those of the target Rasa release; agent
# commands only in projects with sub-agents, see `command_line_node`).
BARE_COMMANDS: tuple[type[Command], ...] = (
    CancelFlow,
    ChitChat,
    Knowledge,
    SkipQuestion,
    RepeatLastBotMessages,
    HumanHandoff,
    CannotHandle,
)
MAX_TEXT_VALUE = 64  # characters (bytes in the matcher) of a free-text slot value
MAX_CLARIFY_OPTIONS = 5
MAX_LINES = 8
BOOL_VALUES = ("True", "False", "true", "false")  # canonical first; the parser and the validator accept both cases
_REGEX_SPECIALS = set(".^$*+?{}[]\\|()")
_PLACEHOLDER_A, _PLACEHOLDER_B = "\x00", "\x01"


# ---------------------------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class CharClass:
    """A set of characters: `regex` is its character-class text; `ascii` the ASCII bytes it admits, and with
    `non_ascii` every other character too (as a well-formed UTF-8 sequence, so a bound counts characters)."""

    regex: str
    ascii: frozenset[int]
    non_ascii: bool = False


@dataclass(frozen=True)
class Seq:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    node: Node
    min: int
    max: int


Node = Literal | CharClass | Seq | Alt | Repeat

DIGIT = CharClass("[0-9]", frozenset(range(ord("0"), ord("9") + 1)))
# Free text: one line. No control characters (C0, DEL, C1) and no U+2028/U+2029, which `str.splitlines` (and so the
# answer parser) treats as line breaks; the first character is not a space either.
_NOT_TEXT = "\\x7f-\\x9f\u2028\u2029"
TEXT_FIRST = CharClass(f"[^\\x00-\\x20{_NOT_TEXT}]", frozenset(range(0x21, 0x7F)), non_ascii=True)
TEXT_CHAR = CharClass(f"[^\\x00-\\x1f{_NOT_TEXT}]", frozenset(range(0x20, 0x7F)), non_ascii=True)
_ANY = range(0x80, 0xC0)  # a continuation byte
# Well-formed UTF-8 beyond ASCII (RFC 3629) minus U+0080-U+009F and U+2028/U+2029: per sequence, the byte ranges.
UTF8_SEQUENCES: tuple[tuple[range, ...], ...] = (
    (range(0xC2, 0xC3), range(0xA0, 0xC0)),
    (range(0xC3, 0xE0), _ANY),
    (range(0xE0, 0xE1), range(0xA0, 0xC0), _ANY),
    (range(0xE1, 0xE2), _ANY, _ANY),
    (range(0xE2, 0xE3), range(0x80, 0x81), range(0x80, 0xA8)),  # U+2000-U+2027
    (range(0xE2, 0xE3), range(0x80, 0x81), range(0xAA, 0xC0)),  # U+202A-U+203F
    (range(0xE2, 0xE3), range(0x81, 0xC0), _ANY),
    (range(0xE3, 0xED), _ANY, _ANY),
    (range(0xED, 0xEE), range(0x80, 0xA0), _ANY),
    (range(0xEE, 0xF0), _ANY, _ANY),
    (range(0xF0, 0xF1), range(0x90, 0xC0), _ANY, _ANY),
    (range(0xF1, 0xF4), _ANY, _ANY, _ANY),
    (range(0xF4, 0xF5), range(0x80, 0x90), _ANY, _ANY),
)


def _escape(text: str) -> str:
    # Only regex metacharacters: vLLM's regex engines (xgrammar, outlines) read `\-` or `\ ` less reliably.
    return "".join("\\" + char if char in _REGEX_SPECIALS else char for char in text)


def to_regex(node: Node) -> str:
    """The node as a regular expression (Python `re` syntax, which vLLM's structured outputs accept too)."""
    match node:
        case Literal(text=text):
            return _escape(text)
        case CharClass(regex=regex):
            return regex
        case Seq(parts=parts):
            return "".join(_group_if_alt(part) for part in parts)
        case Alt(options=options):
            return "|".join(to_regex(option) for option in options)
        case Repeat(node=inner, min=low, max=high):
            body = to_regex(inner)
            if not isinstance(inner, CharClass) and not (isinstance(inner, Literal) and len(inner.text) == 1):
                body = f"(?:{body})"
            return body + ("?" if (low, high) == (0, 1) else f"{{{low},{high}}}")
    raise TypeError(node)


def _group_if_alt(node: Node) -> str:
    text = to_regex(node)
    return f"(?:{text})" if isinstance(node, Alt) else text


def _choice(words: Iterable[str]) -> Alt:
    return Alt(tuple(Literal(word) for word in words))


# ---------------------------------------------------------------------------------------------- the project's language


def startable_flow_ids(project: Project) -> list[str]:
    """User flows a command may start: all but those reachable only through link/call (`if: False`)."""
    return [flow.id for flow in project.user_flows if (flow.guard or "").strip().lower() != "false"]


def fillable_slots(project: Project) -> list[str]:
    """Slots the command generator may set: collected by some flow, and not mapped away from the LLM."""
    names: set[str] = set()
    for flow in project.flows.values():
        for step in flow.collect_steps():
            slot = project.domain.slots.get(step.collect or "")
            if slot is not None and slot.llm_fillable:
                names.add(slot.name)
    return sorted(names)


def _parts(template: str) -> list[str]:
    """Split a formatted command at its placeholders: `set slot \\x00 \\x01` -> ['set slot ', ' ', '']."""
    return template.replace(_PLACEHOLDER_B, _PLACEHOLDER_A).split(_PLACEHOLDER_A)


def _value_node(project: Project, slot_name: str) -> tuple[str, Node]:
    """A key naming the value language (slots with equal keys share one node) and the node."""
    slot = project.domain.slots[slot_name]
    if slot.type == "categorical" and slot.values:
        return f"categorical:{slot.values}", _choice(slot.values)
    if slot.type == "bool":
        return "bool", _choice(BOOL_VALUES)
    if slot.type == "float":
        number = Seq(
            (Repeat(Literal("-"), 0, 1), Repeat(DIGIT, 1, 9), Repeat(Seq((Literal("."), Repeat(DIGIT, 1, 6))), 0, 1))
        )
        return "float", number
    return "text", Seq((TEXT_FIRST, Repeat(TEXT_CHAR, 0, MAX_TEXT_VALUE - 1)))


def command_line_node(
    project: Project, syntax: Syntax, kinds: Iterable[str] | None = None, flows: Sequence[str] | None = None
) -> Node:
    """One valid command line of `project` in `syntax`, as the canonical printer writes it; `flows` are the flows a
    command may start (default: every one that is not reached only through a link or call)."""
    if syntax is Syntax.SHORT:
        raise ConfigError("the short DU dialect is an input alias only; constrain to v1, v2 or v3")
    wanted = set(kinds) if kinds is not None else None
    lines: list[Node] = []
    flows = list(flows) if flows is not None else startable_flow_ids(project)
    flow_choice = _choice(flows)
    if flows and (wanted is None or StartFlow.kind in wanted):
        before, after = _parts(format_command(StartFlow(_PLACEHOLDER_A), syntax))
        lines.append(Seq((Literal(before), flow_choice, Literal(after))))
    if wanted is None or SetSlot.kind in wanted:
        before, between, after = _parts(format_command(SetSlot(_PLACEHOLDER_A, _PLACEHOLDER_B), syntax))
        groups: dict[str, tuple[Node, list[str]]] = {}
        for name in fillable_slots(project):
            key, value = _value_node(project, name)
            groups.setdefault(key, (value, []))[1].append(name)
        for value, names in groups.values():
            lines.append(Seq((Literal(before), _choice(names), Literal(between), value, Literal(after))))
    if len(flows) >= 2 and (wanted is None or Clarify.kind in wanted):
        # Clarify keeps options sorted; with placeholders \x00 < \x01 the template reads prefix, a, sep, b, suffix.
        before, separator, after = _parts(format_command(Clarify((_PLACEHOLDER_A, _PLACEHOLDER_B)), syntax))
        more = Repeat(Seq((Literal(separator), flow_choice)), 1, min(len(flows), MAX_CLARIFY_OPTIONS) - 1)
        lines.append(Seq((Literal(before), flow_choice, more, Literal(after))))
    offered = version_kinds(project.rasa_version)
    for command_type in BARE_COMMANDS:
        if (wanted is None or command_type.kind in wanted) and command_type.kind in offered:
            lines.append(Literal(format_command(command_type(), syntax)))
    agents = sorted(project.agents) if ContinueAgent.kind in offered else []
    if agents and (wanted is None or ContinueAgent.kind in wanted):
        lines.append(Literal(format_command(ContinueAgent(), syntax)))
    if agents and (wanted is None or RestartAgent.kind in wanted):
        before, after = _parts(format_command(RestartAgent(_PLACEHOLDER_A), syntax))
        lines.append(Seq((Literal(before), _choice(agents), Literal(after))))
    for spec in project.custom_commands:
        if wanted is None or spec.name in wanted:
            lines.append(_custom_node(project, spec, syntax, flows, agents))
    if not lines:
        raise ConfigError("no command is possible for this assistant with the commands asked for")
    return Alt(tuple(lines))


def _custom_node(
    project: Project, spec: CustomCommandSpec, syntax: Syntax, flows: Sequence[str], agents: Sequence[str]
) -> Node:
    """A project's own command as its declared form prints it, each argument from its type's language."""
    from recipe.commands import _PLACEHOLDER

    form, at = spec.form(syntax), 0
    parts: list[Node] = []
    types = dict(spec.arguments)
    text = Seq((TEXT_FIRST, Repeat(TEXT_CHAR, 0, MAX_TEXT_VALUE - 1)))
    for match in _PLACEHOLDER.finditer(form):
        parts.append(Literal(form[at : match.start()]))
        kind = types[match.group(1)]
        by_type: dict[str, Node] = {
            "flow": _choice(flows),
            "slot": _choice(fillable_slots(project)),
            "agent": _choice(agents or sorted(project.agents)),
        }
        parts.append(by_type.get(kind, text))  # a placeholder by its argument type; free text otherwise
        at = match.end()
    parts.append(Literal(form[at:]))
    return Seq(tuple(part for part in parts if not (isinstance(part, Literal) and not part.text)))


def answer_node(line: Node, max_lines: int = MAX_LINES) -> Node:
    """One to `max_lines` command lines joined by newlines, nothing before or after."""
    if max_lines <= 1:
        return line
    return Seq((line, Repeat(Seq((Literal("\n"), line)), 0, max_lines - 1)))


@dataclass
class CommandGrammar:
    """The valid answers of one assistant in one syntax: `regex` for endpoints, `matcher()` for local decoding."""

    syntax: Syntax
    node: Node
    flows: tuple[str, ...]
    slots: tuple[str, ...]
    _matcher: ByteMatcher | None = field(default=None, repr=False)

    @property
    def regex(self) -> str:
        return to_regex(self.node)

    def structured_outputs(self) -> dict[str, str]:
        """The request field vLLM (>= 0.12) reads to constrain decoding to this grammar."""
        return {"regex": self.regex}

    def matcher(self) -> ByteMatcher:
        if self._matcher is None:
            self._matcher = ByteMatcher(self.node)
        return self._matcher


def build_grammar(
    project: Project,
    syntax: Syntax,
    *,
    kinds: Iterable[str] | None = None,
    max_lines: int = MAX_LINES,
    flows: Sequence[str] | None = None,
) -> CommandGrammar:
    """The grammar of `project`'s valid answers in `syntax`; `kinds` limits the command kinds (default: all), `flows`
    the flows that may be started (default: all but link/call-only ones; pass those startable in a dialogue state)."""
    flows = tuple(flows) if flows is not None else tuple(startable_flow_ids(project))
    node = answer_node(command_line_node(project, syntax, kinds, flows), max_lines)
    return CommandGrammar(syntax, node, flows, tuple(fillable_slots(project)))


def grammar_from_regex(project: Project, syntax: Syntax, regex: str) -> CommandGrammar | None:
    """The grammar of `project` whose regex is `regex` (one built for some set of startable flows), or None.

    For a server that knows the project but not the dialogue state: the flows are read back from the regex's
    `start flow` alternatives, the grammar is rebuilt for them, and only an exact match is accepted.
    """
    before, after = _parts(format_command(StartFlow(_PLACEHOLDER_A), syntax))
    opening, closing = to_regex(Literal(before)) + "(?:", ")" + to_regex(Literal(after))
    start = regex.find(opening)
    flows: tuple[str, ...] = ()
    if start >= 0:
        end = regex.find(closing, start + len(opening))
        if end < 0:
            return None
        flows = tuple(name.replace("\\", "") for name in regex[start + len(opening) : end].split("|"))
    if not set(flows) <= set(startable_flow_ids(project)):
        return None
    grammar = build_grammar(project, syntax, flows=flows)
    return grammar if grammar.regex == regex else None


# ---------------------------------------------------------------------------------------------- byte automaton

DEAD = -1


class _Nfa:
    """Thompson construction over bytes: per state, epsilon targets and byte -> targets."""

    def __init__(self) -> None:
        self.epsilon: list[list[int]] = []
        self.moves: list[dict[int, list[int]]] = []

    def new_state(self) -> int:
        self.epsilon.append([])
        self.moves.append({})
        return len(self.epsilon) - 1

    def _add_moves(self, state: int, allowed: Iterable[int], target: int) -> None:
        for byte in allowed:
            self.moves[state].setdefault(byte, []).append(target)

    def build(self, node: Node, start: int) -> int:
        """Add `node` after `start`; return its end state."""
        match node:
            case Literal(text=text):
                state = start
                for byte in text.encode("utf-8"):
                    target = self.new_state()
                    self.moves[state].setdefault(byte, []).append(target)
                    state = target
                return state
            case CharClass(ascii=allowed, non_ascii=non_ascii):
                target = self.new_state()
                self._add_moves(start, allowed, target)
                if non_ascii:
                    for sequence in UTF8_SEQUENCES:
                        state = start
                        for index, byte_range in enumerate(sequence):
                            following = target if index == len(sequence) - 1 else self.new_state()
                            self._add_moves(state, byte_range, following)
                            state = following
                return target
            case Seq(parts=parts):
                state = start
                for part in parts:
                    state = self.build(part, state)
                return state
            case Alt(options=options):
                end = self.new_state()
                for option in options:
                    self.epsilon[self.build(option, start)].append(end)
                return end
            case Repeat(node=inner, min=low, max=high):
                state = start
                for _ in range(low):
                    state = self.build(inner, state)
                end = self.new_state()
                self.epsilon[state].append(end)
                for _ in range(high - low):  # each optional copy may be the last
                    state = self.build(inner, state)
                    self.epsilon[state].append(end)
                return end
        raise TypeError(node)

    def distances_to(self, accept: int) -> list[float]:
        """Fewest bytes from each state to `accept` (0-1 BFS on the reversed graph)."""
        reverse: list[list[tuple[int, int]]] = [[] for _ in self.epsilon]
        for state, targets in enumerate(self.epsilon):
            for target in targets:
                reverse[target].append((state, 0))
        for state, moves in enumerate(self.moves):
            for target in {t for targets in moves.values() for t in targets}:
                reverse[target].append((state, 1))
        distance = [math.inf] * len(self.epsilon)
        distance[accept] = 0
        frontier = [accept]
        while frontier:  # relax until nothing changes (bounded repeats keep the graph acyclic, so this ends fast)
            changed = []
            for state in frontier:
                for source, cost in reverse[state]:
                    if distance[state] + cost < distance[source]:
                        distance[source] = distance[state] + cost
                        changed.append(source)
            frontier = changed
        return distance


class ByteMatcher:
    """A DFA over UTF-8 bytes, built lazily from the NFA as states are reached. States are ints; `DEAD` is -1."""

    def __init__(self, node: Node):
        self._nfa = _Nfa()
        start = self._nfa.new_state()
        self._accept = self._nfa.build(node, start)
        self._distance = self._nfa.distances_to(self._accept)
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._transitions: list[dict[int, int]] = []
        self.start = self._state_for(self._closure({start}))

    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(seen)
        while stack:
            for target in self._nfa.epsilon[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)

    def _state_for(self, states: frozenset[int]) -> int:
        if not states:
            return DEAD
        if states not in self._ids:
            self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._transitions.append({})
        return self._ids[states]

    def step(self, state: int, byte: int) -> int:
        if state == DEAD:
            return DEAD
        known = self._transitions[state]
        if byte not in known:
            targets = [t for s in self._sets[state] for t in self._nfa.moves[s].get(byte, ())]
            known[byte] = self._state_for(self._closure(targets))
        return known[byte]

    def feed(self, state: int, data: bytes) -> int:
        for byte in data:
            state = self.step(state, byte)
            if state == DEAD:
                return DEAD
        return state

    def accepts(self, state: int) -> bool:
        return state != DEAD and self._accept in self._sets[state]

    def bytes_to_accept(self, state: int) -> float:
        """Fewest bytes that complete an answer from `state` (inf when dead)."""
        if state == DEAD:
            return math.inf
        return min(self._distance[s] for s in self._sets[state])

    def fullmatch(self, text: str) -> bool:
        return self.accepts(self.feed(self.start, text.encode("utf-8")))

    def is_prefix(self, text: str) -> bool:
        return self.feed(self.start, text.encode("utf-8")) != DEAD
