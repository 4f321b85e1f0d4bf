"""Rephrasing: N paraphrases of every annotated user message of a conversation.

With an LLM: one call per conversation that lists exactly the messages to paraphrase (with ids; the rest of the
transcript is marked as context), asking for JSON. What comes back is read tolerantly: JSON where the endpoint gave
JSON, numbered text blocks otherwise, message by message, so one bad block never loses the others. Messages that come
back short get one follow-up call. Copies of the original and duplicates are dropped.

Offline: honest variants written by rule that keep every slot value verbatim, including voice-channel variants
(lower case, no punctuation, fillers, spoken numbers) for assistants used over the phone.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from recipe.llm import LLMCallFailed, LLMClient
from recipe.prompt import PromptRenderer
from recipe.textnorm import normalize_text, number_to_words

USER_PREFIX = "USER"
REPHRASE_PROMPT_VARIABLES = frozenset(
    {
        "test_case_name",
        "transcript",
        "number_of_rephrasings",
        "number_of_user_messages",
        "user_prefix",
        "user_messages",
    }
)


@dataclass(frozen=True)
class MessageToRephrase:
    id: int  # 1-based position in the list sent to the LLM
    turn: int  # the user turn it belongs to
    text: str


@dataclass(frozen=True)
class _ListedMessage:
    """A message as the rephrase template sees it: `message.id`, `message.text`, and printed as its text, so a
    template written for Rasa Pro's rephraser (which loops over plain strings) renders the same."""

    id: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class RephraseOutcome:
    candidates: dict[int, list[str]]  # turn -> paraphrases (cleaned, at most N)
    requested: int
    calls: int = 0
    errors: list[str] = field(default_factory=list)


def clean_candidates(original: str, candidates: list[str], limit: int) -> list[str]:
    """Drop empties, copies of the original and duplicates (after normalisation); keep at most `limit`."""
    seen = {normalize_text(original)}
    kept = []
    for candidate in candidates:
        text = " ".join(str(candidate).split()).strip().strip('"').strip()
        key = normalize_text(text)
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append(text)
        if len(kept) == limit:
            break
    return kept


# ---------------------------------------------------------------------------------------------- parsing answers

_NUMBERED = re.compile(r"^\s*(?:\d+\s*[.)]|[-*•])\s+(.*\S)\s*$")  # `1. x`, `2) x`, `- x`; not `3.5 kg`
_JSON_BLOCK = re.compile(r"\{.*\}", re.DOTALL)


def _from_json(text: str, messages: list[MessageToRephrase]) -> dict[int, list[str]] | None:
    match = _JSON_BLOCK.search(text)
    if not match:
        return None
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    entries = data.get("rephrasings") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    by_id = {m.id: m for m in messages}
    found: dict[int, list[str]] = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        texts = entry.get("texts") or entry.get("rephrasings") or []
        identifier = entry.get("id")
        message = by_id.get(identifier) if isinstance(identifier, int) else None
        if message is None and position < len(messages):  # no usable id: fall back to the position
            message = messages[position]
        if message is not None and isinstance(texts, list):
            found.setdefault(message.turn, []).extend(str(t) for t in texts if isinstance(t, (str, int, float)))
    return found


def _from_numbered_text(text: str, messages: list[MessageToRephrase]) -> dict[int, list[str]]:
    """Blocks of `USER: <original>` (or `<id>. <original>`) followed by numbered paraphrases."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.upper().startswith(f"{USER_PREFIX}:"):
            blocks.append((stripped[len(USER_PREFIX) + 1 :].strip(), []))
            continue
        numbered = _NUMBERED.match(line)
        if numbered and blocks:
            blocks[-1][1].append(numbered.group(1))
    # Match each block to its message by the echoed original first; blocks whose echo matches nothing then go, in
    # order, to the messages still unmatched at the same position (models sometimes reword the echo).
    found: dict[int, list[str]] = {}
    owner: dict[int, MessageToRephrase] = {}
    for index, (echo, _) in enumerate(blocks):
        match = next(
            (m for m in messages if normalize_text(m.text) == normalize_text(echo) and m not in owner.values()), None
        )
        if match is not None:
            owner[index] = match
    for index in range(len(blocks)):
        if index not in owner and index < len(messages) and messages[index] not in owner.values():
            owner[index] = messages[index]
    for index, message in sorted(owner.items()):
        found.setdefault(message.turn, []).extend(blocks[index][1])
    return found


def parse_rephrasings(text: str, messages: list[MessageToRephrase]) -> dict[int, list[str]]:
    """Paraphrases per turn from an LLM answer in JSON or numbered-text form; unreadable parts are skipped."""
    parsed = _from_json(text, messages)
    if parsed:
        return parsed
    return _from_numbered_text(text, messages)


# ---------------------------------------------------------------------------------------------- LLM rephrasing


def rephrase_prompt(
    renderer: PromptRenderer, test_case_name: str, transcript: str, messages: list[MessageToRephrase], count: int
) -> str:
    return renderer.render(
        {
            "test_case_name": test_case_name,
            "transcript": transcript,
            "number_of_rephrasings": count,
            "number_of_user_messages": len(messages),
            "user_prefix": USER_PREFIX,
            "user_messages": [_ListedMessage(m.id, m.text) for m in messages],
        }
    )


JSON_RESPONSE_FORMAT: dict[str, Any] = {"type": "json_object"}


async def rephrase_conversation(
    client: LLMClient,
    renderer: PromptRenderer,
    test_case_name: str,
    transcript: str,
    messages: list[MessageToRephrase],
    count: int,
) -> RephraseOutcome:
    """One call for the whole conversation, then one follow-up for the messages that came back short."""
    outcome = RephraseOutcome(candidates={m.turn: [] for m in messages}, requested=count * len(messages))
    pending = list(messages)
    for attempt in range(2):
        if not pending:
            break
        wanted = count if attempt == 0 else max(count - min(len(outcome.candidates[m.turn]) for m in pending), 1)
        ids = [MessageToRephrase(i + 1, m.turn, m.text) for i, m in enumerate(pending)]
        prompt = rephrase_prompt(renderer, test_case_name, transcript, ids, wanted)
        outcome.calls += 1
        try:
            result = await client.chat(
                [{"role": "user", "content": prompt}], sample_index=attempt, response_format=JSON_RESPONSE_FORMAT
            )
        except LLMCallFailed as error:
            outcome.errors.append(f"rephrase call failed after {error.attempts} attempts: {error.last_error}")
            if error.fails_every_call:
                raise
            break
        parsed = parse_rephrasings(result.text, ids)
        for message in pending:
            merged = outcome.candidates[message.turn] + parsed.get(message.turn, [])
            outcome.candidates[message.turn] = clean_candidates(message.text, merged, count)
        pending = [m for m in pending if len(outcome.candidates[m.turn]) < count]
    return outcome


# ---------------------------------------------------------------------------------------------- offline rules

_GREETINGS = ["Hi, ", "Hello, ", "Hey, "]  # only where a conversation starts
_LEAD_INS = ["Okay, ", "Right, ", "So, ", "Well, "]
_SUFFIXES = [", please", " please", ", thanks", ", thank you"]
_FILLERS = ["uh ", "um ", "well ", "hmm ", "so uh "]
_POLITE = re.compile(r"\b(please|thanks|thank you|cheers)\b", re.IGNORECASE)
# Whole-phrase swaps at the start of the message only, where they cannot change the meaning
# (`Do I need a visa?` must not become `Do I'd like a visa?`).
_SWAPS = [
    (r"^I would like\b", "I'd like"),
    (r"^I'd like\b", "I want"),
    (r"^I want\b", "I'd like"),
    (r"^I need\b", "I'd like"),
    (r"^I am\b", "I'm"),
    (r"^I'm\b", "I am"),
    (r"^can you\b", "could you"),
    (r"^could you\b", "can you"),
    (r"^yes\b(?=[,.!]|$)", "yeah"),
    (r"^no\b(?=[,.!]|$)", "nope"),
]
_KEEP_CAPITAL = {"I", "I'm", "I'd", "I'll", "I've"}


def _restore_values(text: str, values: list[str]) -> str:
    """Put every protected value back in its original spelling (a paraphrase lower-cased it)."""
    for value in values:

        def original(_m: re.Match[str], v: str = value) -> str:
            return v

        text = re.sub(re.escape(value.lower()), original, text) if value.lower() != value else text
    return text


def _voice(text: str, values: list[str]) -> str:
    """What a speech-to-text channel delivers: lower case, no sentence punctuation; values keep their spelling,
    since the label copies them exactly as written."""
    spoken = re.sub(r"[.,!?;:](?=\s|$)", "", text.lower())
    return _restore_values(" ".join(spoken.split()), values)


def _spoken_numbers(text: str, values: list[str]) -> str:
    """Small standalone numbers in words, but never inside a value (`22 March`) or a time or code (`14:05`)."""
    protected = [
        (m.start(), m.end()) for v in values if not v.strip().isdigit() for m in re.finditer(re.escape(v), text)
    ]

    def speak(match: re.Match) -> str:
        inside = any(start <= match.start() < end for start, end in protected)
        return match.group(0) if inside else number_to_words(int(match.group(0)))

    return re.sub(r"(?<![\w.,:/-])\d{1,2}(?![\w.,:/-]\w)", speak, text)


def _lead_in(prefix: str, text: str, values: list[str]) -> str:
    first = text.split()[0] if text.split() else ""
    keep = first.rstrip(",.!?") in _KEEP_CAPITAL or any(text.startswith(v) for v in values)
    return prefix + (text if keep else text[:1].lower() + text[1:])


def rule_based_rephrasings(
    text: str, count: int, seed: int, values: list[str] | tuple[str, ...] = (), first_turn: bool = True
) -> list[str]:
    """Up to `count` variants of `text` by rule. The slot `values` the message states keep their exact spelling;
    only small standalone numbers may be spoken as words. Greetings open only a conversation's first message."""
    rng = random.Random(f"{seed}:{text}")
    values = [v for v in values if v]
    base = text.strip()
    bare = base.rstrip(".!?")
    is_question = base.endswith("?")
    options: list[str] = []
    for pattern, replacement in _SWAPS:
        swapped = re.sub(pattern, replacement, base, count=1, flags=re.IGNORECASE)
        if swapped != base:
            options.append(swapped)
    options.append(_lead_in(rng.choice(_GREETINGS if first_turn else _LEAD_INS), base, values))
    if not is_question and not _POLITE.search(base):
        options.append(bare + rng.choice(_SUFFIXES))
        options.append(_voice(rng.choice(_LEAD_INS) + bare + rng.choice(_SUFFIXES), values))
    options.append(_voice(base, values))
    options.append(rng.choice(_FILLERS) + _voice(base, values))
    options.append(_voice(_spoken_numbers(base, values), values))
    rng.shuffle(options)
    return clean_candidates(base, options, count)
