"""Flow conditions (`if:` guards, `next` branches, rejections): a small parser and evaluator.

Covers the pypred subset flows use: `slots.x`, `context.x` (`context.x.y`: the pattern frame's context), `not slots.x`,
comparisons (`=`, `==`, `!=`, `<`, `<=`, `>`, `>=`,
`is`, `is not`, `contains`, `matches`), `and`/`or`, parentheses, numbers, quoted strings, true/false, null.
Conditions are parsed once (cached by text) and evaluated against a namespace `{"slots": ..., "context": ...}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>-?\d+(?:\.\d+)?(?![\w.]))
      | (?P<string>"[^"]*"|'[^']*')
      | (?P<op>==|!=|<=|>=|=|<|>|\(|\))
      | (?P<word>[A-Za-z_][A-Za-z0-9_.-]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "is", "contains", "matches"}
_LITERALS = {"true": True, "false": False, "null": None, "none": None, "undefined": None, "empty": None}


class ConditionError(ValueError):
    pass


Evaluator = Callable[[Mapping[str, Any]], Any]  # takes the namespace built by `namespace()`


@dataclass
class _Parser:
    tokens: list[tuple[str, str]]
    source: str
    position: int = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ConditionError(f"condition `{self.source}` ends too early")
        self.position += 1
        return token

    def accept_word(self, word: str) -> bool:
        token = self.peek()
        if token and token[0] == "word" and token[1].lower() == word:
            self.position += 1
            return True
        return False

    def parse_or(self) -> Evaluator:
        left = self.parse_and()
        while self.accept_word("or"):
            right, previous = self.parse_and(), left

            def either(ns: Mapping[str, Any], a: Evaluator = previous, b: Evaluator = right) -> bool:
                return bool(a(ns)) or bool(b(ns))

            left = either
        return left

    def parse_and(self) -> Evaluator:
        left = self.parse_not()
        while self.accept_word("and"):
            right, previous = self.parse_not(), left

            def both(ns: Mapping[str, Any], a: Evaluator = previous, b: Evaluator = right) -> bool:
                return bool(a(ns)) and bool(b(ns))

            left = both
        return left

    def parse_not(self) -> Evaluator:
        if self.accept_word("not"):
            inner = self.parse_not()
            return lambda ns: not inner(ns)
        return self.parse_comparison()

    def parse_comparison(self) -> Evaluator:
        left = self.parse_operand()
        token = self.peek()
        if token is None:
            return left
        kind, text = token
        if kind == "op" and text in ("=", "==", "!=", "<", "<=", ">", ">="):
            self.position += 1
            operator = text
        elif kind == "word" and text.lower() in ("is", "contains", "matches"):
            self.position += 1
            operator = text.lower()
            if operator == "is" and self.accept_word("not"):
                operator = "is not"
        else:
            return left
        right = self.parse_operand()
        compare = _COMPARISONS[operator]
        return lambda ns: compare(left(ns), right(ns))

    def parse_operand(self) -> Evaluator:
        kind, text = self.take()
        if kind == "op" and text == "(":
            inner = self.parse_or()
            if self.take() != ("op", ")"):
                raise ConditionError(f"condition `{self.source}`: expected `)`")
            return inner
        if kind == "number":
            value = float(text) if "." in text else int(text)
            return lambda ns: value
        if kind == "string":
            string = text[1:-1]
            return lambda ns: string
        if kind == "word":
            lowered = text.lower()
            if lowered in _LITERALS:
                literal = _LITERALS[lowered]
                return lambda ns: literal
            if lowered in _KEYWORDS:
                raise ConditionError(f"condition `{self.source}`: unexpected `{text}`")
            namespace, _, name = text.partition(".")
            if namespace == "slots" and name:
                return lambda ns: (ns.get("slots") or {}).get(name)
            if namespace == "context":
                path = tuple(name.split(".")) if name else ()
                return lambda ns: _lookup(ns.get("context"), path)
            raise ConditionError(f"condition `{self.source}`: `{text}` should be `slots.<name>` or `context.<key>`")
        raise ConditionError(f"condition `{self.source}`: unexpected `{text}`")


def _lookup(value: Any, path: tuple[str, ...]) -> Any:
    """`context.a.b`: walk the pattern frame's context; a missing key is unset (None), as pypred's undefined."""
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return _as_bool(a) == _as_bool(b)
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return str(a) == str(b)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _ordered(check: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        na, nb = _number(a), _number(b)
        return na is not None and nb is not None and check(na, nb)

    return compare


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "=": _equal,
    "==": _equal,
    "is": _equal,
    "!=": lambda a, b: not _equal(a, b),
    "is not": lambda a, b: not _equal(a, b),
    "<": _ordered(lambda a, b: a < b),
    "<=": _ordered(lambda a, b: a <= b),
    ">": _ordered(lambda a, b: a > b),
    ">=": _ordered(lambda a, b: a >= b),
    "contains": lambda a, b: a is not None and b is not None and str(b) in (a if isinstance(a, list) else str(a)),
    "matches": lambda a, b: a is not None and b is not None and re.search(str(b), str(a)) is not None,
}


@lru_cache(maxsize=4096)
def parse_condition(source: str) -> Evaluator:
    """Compile a condition; raise ConditionError saying what is wrong."""
    tokens: list[tuple[str, str]] = []
    position = 0
    text = source.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ConditionError(f"condition `{source}`: cannot read `{text[position:].strip()}`")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    if not tokens:
        raise ConditionError("empty condition")
    parser = _Parser(tokens, source)
    evaluator = parser.parse_or()
    if parser.peek() is not None:
        raise ConditionError(f"condition `{source}`: unexpected `{parser.peek()[1]}`")  # type: ignore[index]
    return evaluator


def namespace(slots: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a condition is evaluated against, as at runtime: `slots.` and the top stack frame's `context.`."""
    return {"slots": slots, "context": context or {}}


def render_condition(source: str, context: Mapping[str, Any] | None = None) -> str:
    """The runtime renders a condition as a Jinja2 template over `context` before parsing it
    (`slots.{{context.collect}} is not null` in the collect pattern); plain conditions pass unchanged."""
    if "{{" not in source and "{%" not in source:
        return source
    return jinja2.Template(source).render({"context": context or {}})


def evaluate(source: str, slots: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> bool:
    """Does the condition hold for these slot values (and this pattern context)? Unset slots and keys are None."""
    return bool(parse_condition(render_condition(source, context))(namespace(slots, context)))
