"""Validation: does a paraphrase still mean exactly what the original said?

With an oracle LLM: the oracle gets the original turn's prompt with only the user message replaced and must
reproduce the original commands. Commands are compared as multisets of (type, flow, slot, value), values normalised
(case, spacing, punctuation, number and currency forms), so a paraphrase that changes a value fails instead of
inheriting the old value as its label. `loose` compares slot names only, and then the oracle's own commands become
the paraphrase's label. Offline, a lexical check stands in: every slot value the original message states must still
be stated by the paraphrase.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from recipe.commands import Command, SetSlot, Syntax, command_key, parse_model_output
from recipe.llm import LLMCallFailed, LLMClient
from recipe.textnorm import contains_value, normalize_value

STRICT, LOOSE, LEXICAL = "strict", "loose", "lexical"


@dataclass(frozen=True)
class Verdict:
    text: str
    passed: bool
    label: tuple[Command, ...] | None  # the commands a row for this paraphrase is trained on
    check: str  # strict | loose | lexical
    reason: str | None = None


def difference(
    expected: list[Command] | tuple[Command, ...],
    predicted: list[Command] | tuple[Command, ...],
    with_values: bool = True,
) -> str | None:
    """None when the two multisets agree, else what is missing and what is extra."""
    want = Counter(command_key(c, with_values=with_values, normalize=normalize_value) for c in expected)
    got = Counter(command_key(c, with_values=with_values, normalize=normalize_value) for c in predicted)
    if want == got:
        return None
    missing = list((want - got).elements())
    extra = list((got - want).elements())
    return f"missing {missing}, extra {extra}"


async def validate_with_oracle(
    client: LLMClient, prompt: str, paraphrase: str, expected: list[Command], syntax: Syntax, mode: str = STRICT
) -> Verdict:
    try:
        result = await client.chat([{"role": "user", "content": prompt}])
    except LLMCallFailed as error:
        if error.fails_every_call:
            raise
        return Verdict(paraphrase, False, None, mode, f"oracle call failed: {error.last_error}")
    parsed = parse_model_output(result.text, syntax)
    if parsed.unparsed_lines:
        return Verdict(paraphrase, False, None, mode, f"oracle answer not parseable: {parsed.unparsed_lines[0]!r}")
    problem = difference(expected, parsed.commands, with_values=(mode == STRICT))
    if problem:
        return Verdict(paraphrase, False, None, mode, problem)
    label = tuple(expected) if mode == STRICT else parsed.commands
    return Verdict(paraphrase, True, label, mode)


def validate_lexically(original: str, paraphrase: str, expected: list[Command]) -> Verdict:
    """Offline stand-in for the oracle: the values the original states are all still there."""
    for command in expected:
        if isinstance(command, SetSlot) and command.value is not None and contains_value(original, command.value):
            if not contains_value(paraphrase, command.value):
                return Verdict(paraphrase, False, None, LEXICAL, f"value {command.value!r} is gone")
    return Verdict(paraphrase, True, tuple(expected), LEXICAL)
