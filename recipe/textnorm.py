"""Text and value normalisation shared by rephrasing (dedup) and validation (value comparison).

`normalize_value` decides when two slot values say the same thing: case, spacing, punctuation, number words and
currency forms are folded (`"Forty euros"`, `"40 EUR"`, `"€40.00"` and `"40"` are equal), so that a paraphrase that
changes a value is caught while one that only changes its spelling passes.
"""

from __future__ import annotations

import re
import unicodedata

_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_CURRENCY = re.compile(r"[$€£¥]|\b(?:usd|eur|gbp|euros?|dollars?|pounds?|bucks)\b")
_PUNCTUATION = re.compile(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)")
# In values only sentence punctuation, quotes and brackets go: `C++`, `C#` and `AT&T` keep their symbols.
_VALUE_PUNCTUATION = re.compile(r"[!?;:\"'`()\[\]{}]|,(?!\d{3}\b)|(?<!\d)\.|\.(?!\d)")


def number_to_words(number: int) -> str:
    """0..999 in words (`42` -> `forty-two`); larger numbers stay digits."""
    if number < 20:
        return _UNITS[number]
    if number < 100:
        tens, unit = divmod(number, 10)
        return _TENS[tens] + (f"-{_UNITS[unit]}" if unit else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_UNITS[hundreds]} hundred" + (f" and {number_to_words(rest)}" if rest else "")
    return str(number)


_WORD_NUMBERS = {number_to_words(n): n for n in range(100)} | {
    number_to_words(n).replace("-", " "): n for n in range(20, 100)
}
_WORD_NUMBER_PATTERN = re.compile(
    r"\b(" + "|".join(sorted((re.escape(w) for w in _WORD_NUMBERS), key=len, reverse=True)) + r")\b"
)


def words_to_digits(text: str) -> str:
    """`two nights` -> `2 nights` (lower-case input)."""
    return _WORD_NUMBER_PATTERN.sub(lambda m: str(_WORD_NUMBERS[m.group(1)]), text)


def normalize_text(text: str) -> str:
    """For deduplicating paraphrases: case, spacing and punctuation do not make a new paraphrase."""
    folded = unicodedata.normalize("NFC", text).casefold()
    folded = _PUNCTUATION.sub(" ", folded)
    return " ".join(folded.split())


def normalize_value(value: str | None) -> str | None:
    """A slot value in a canonical form for comparison (None stays None)."""
    if value is None:
        return None
    folded = unicodedata.normalize("NFC", str(value)).casefold().replace("_", " ")
    folded = _CURRENCY.sub(" ", folded)
    folded = words_to_digits(folded)
    folded = re.sub(r"(\d),(\d{3})\b", r"\1\2", folded)  # 1,200 -> 1200
    folded = _VALUE_PUNCTUATION.sub(" ", folded)
    folded = re.sub(r"\b(\d+)\.0+\b", r"\1", folded)  # 40.00 -> 40
    return " ".join(folded.split())


def contains_value(text: str, value: str) -> bool:
    """Does `text` still say `value` (in any of the folded forms)?"""
    wanted = normalize_value(value)
    if not wanted:
        return True
    haystack = f" {normalize_value(text)} "
    return f" {wanted} " in haystack
