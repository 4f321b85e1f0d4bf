"""Constrained decoding: the command grammar's byte automaton (`recipe.grammar`) walked over a tokenizer's vocabulary.

`TokenVocabulary` reads every token's bytes (byte-level BPE and SentencePiece alike) into a trie; `TokenConstraint`
says, per automaton state and token budget, which tokens keep the answer inside the language (cached per state);
`CommandLogitsProcessor` is the transformers logits processor that applies it at every step, allowing the
end-of-sequence token only after a complete line.

Nothing here imports torch; the logits processor touches tensors only through the `scores` it is handed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from recipe.grammar import DEAD, ByteMatcher, CommandGrammar

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------------------------------------- tokens


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's `bytes_to_unicode`)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def _uses_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return decoder is not None and ("ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder))


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id adds to the text; None for special tokens (never allowed inside an answer).

    Byte-level BPE tokens map back through GPT-2's byte table; SentencePiece tokens spell spaces as `▁` and raw
    bytes as `<0xNN>`; anything else is decoded one token at a time.
    """
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special
    }
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = _uses_byte_level(tokenizer)
    decoder = _byte_decoder() if byte_level else {}
    result: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            result.append(None)
        elif byte_level and all(char in decoder for char in piece):
            result.append(bytes(decoder[char] for char in piece))
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            result.append(bytes([int(piece[3:5], 16)]))
        elif "▁" in piece:
            result.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            result.append(tokenizer.decode([token_id]).encode("utf-8"))
    return result


class _TrieNode:
    __slots__ = ("children", "tokens")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.tokens: list[int] = []


class TokenVocabulary:
    """A tokenizer's tokens as bytes, in a trie: built once per tokenizer, shared by every grammar's constraint."""

    def __init__(self, pieces: Sequence[bytes | None]):
        self.pieces = pieces
        self.trie = _TrieNode()
        for token_id, data in enumerate(pieces):
            if data:  # empty and special tokens can never be part of an answer
                node = self.trie
                for byte in data:
                    node = node.children.setdefault(byte, _TrieNode())
                node.tokens.append(token_id)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenVocabulary:
        return cls(token_bytes(tokenizer))


class TokenConstraint:
    """Which tokens keep an answer inside the grammar, per DFA state, cached: the work of a logits processor."""

    def __init__(self, matcher: ByteMatcher, vocabulary: TokenVocabulary, eos_token_ids: Iterable[int]):
        self.matcher = matcher
        self.vocabulary = vocabulary
        self.eos_token_ids = tuple(eos_token_ids)
        self._allowed: dict[int, tuple[list[int], list[float]]] = {}

    def advance(self, state: int, token_id: int) -> int:
        pieces = self.vocabulary.pieces
        data = pieces[token_id] if 0 <= token_id < len(pieces) else None
        return DEAD if data is None else self.matcher.feed(state, data)

    def fits(self, state: int, token_id: int, tokens_left: int) -> bool:
        """May `token_id` come next, with `tokens_left` tokens (this one included) to finish the answer?"""
        if token_id in self.eos_token_ids:
            return self.matcher.accepts(state)
        following = self.advance(state, token_id)
        # The rest needs at most one token per byte (byte-level vocabularies have every byte), then end of sequence.
        return following != DEAD and self.matcher.bytes_to_accept(following) + 1 <= tokens_left - 1

    def allowed(self, state: int, tokens_left: int) -> list[int]:
        """Every token that may come next from `state` within the budget; eos ids when the answer is complete."""
        tokens, distances = self._continuations(state)
        result = [token for token, distance in zip(tokens, distances) if distance + 1 <= tokens_left - 1]
        if self.matcher.accepts(state):
            result.extend(self.eos_token_ids)
        return result

    def _continuations(self, state: int) -> tuple[list[int], list[float]]:
        if state not in self._allowed:
            tokens: list[int] = []
            distances: list[float] = []
            stack = [(self.vocabulary.trie, state)]
            while stack:  # walk the vocabulary trie alongside the DFA; a dead state prunes a whole subtree
                node, here = stack.pop()
                for byte, child in node.children.items():
                    following = self.matcher.step(here, byte)
                    if following == DEAD:
                        continue
                    if child.tokens:
                        distance = self.matcher.bytes_to_accept(following)
                        tokens.extend(child.tokens)
                        distances.extend([distance] * len(child.tokens))
                    stack.append((child, following))
            self._allowed[state] = (tokens, distances)
        return self._allowed[state]


def token_constraint(
    grammar: CommandGrammar, tokenizer: Any, eos_token_ids: Iterable[int], vocabulary: TokenVocabulary | None = None
) -> TokenConstraint:
    return TokenConstraint(grammar.matcher(), vocabulary or TokenVocabulary.from_tokenizer(tokenizer), eos_token_ids)


class CommandLogitsProcessor:
    """A transformers `LogitsProcessor` (duck-typed, so this module needs no torch) that keeps `generate` inside the
    grammar: tokens that would leave it get -inf, end of sequence only after a complete answer, and never more than
    the remaining budget can finish.

    `greedy=True` (our decoding) first checks only the best token and, when it fits, keeps it alone: the result is
    what masking everything would give under argmax, at the cost of one check instead of a vocabulary walk.
    Create one per `generate` call; it tracks each row's DFA state as tokens arrive.
    """

    def __init__(self, constraint: TokenConstraint, prompt_length: int, max_new_tokens: int, greedy: bool = True):
        self.constraint = constraint
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.greedy = greedy
        self._rows: dict[int, tuple[int, int]] = {}  # row -> (tokens consumed, DFA state)
        self.full_masks = 0  # steps that needed the whole allowed set (for the benchmark)
        self.steps = 0

    def _state(self, row: int, generated: list[int]) -> int:
        consumed, state = self._rows.get(row, (0, self.constraint.matcher.start))
        for token_id in generated[consumed:]:
            state = self.constraint.advance(state, token_id)
        self._rows[row] = (len(generated), state)
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = scores.new_full(scores.shape, -math.inf)
        for row in range(scores.shape[0]):
            generated = input_ids[row, self.prompt_length :].tolist()
            if any(token_id in self.constraint.eos_token_ids for token_id in generated):
                masked[row] = scores[row]  # a finished row: generate pads it whatever we say
                continue
            self.steps += 1
            state = self._state(row, generated)
            tokens_left = self.max_new_tokens - len(generated)
            if self.greedy:
                best = int(scores[row].argmax())
                if self.constraint.fits(state, best, tokens_left):
                    masked[row, best] = scores[row, best]
                    continue
            self.full_masks += 1
            allowed = self.constraint.allowed(state, tokens_left) or list(self.constraint.eos_token_ids)
            index = scores.new_tensor(allowed, dtype=input_ids.dtype)
            masked[row, index] = scores[row, index]
        return cast("torch.FloatTensor", masked)
