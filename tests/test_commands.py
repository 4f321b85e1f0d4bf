"""The command language: parsing never crashes, every dialect round-trips, and the tolerant/strict rules hold."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.commands import (
    ALL_SYNTAXES,
    CancelFlow,
    CannotHandle,
    ChitChat,
    Clarify,
    Command,
    CommandParseError,
    ContinueAgent,
    HumanHandoff,
    Knowledge,
    RepeatLastBotMessages,
    RestartAgent,
    SetSlot,
    SkipQuestion,
    StartFlow,
    Syntax,
    command_key,
    detect_syntax,
    format_command,
    format_commands,
    parse_command,
    parse_model_output,
)

FUZZ = settings(max_examples=300, deadline=None)

# ---------------------------------------------------------------------------------------------- strategies

_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
flow_ids = st.builds(
    lambda head, tail: head + tail, st.sampled_from(_ID_CHARS), st.text(alphabet=_ID_CHARS + "-", max_size=20)
)
slot_names = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(_ID_CHARS[:52] + "_"),
    st.text(alphabet=_ID_CHARS + "-", max_size=20),
)

# Words of a slot value: any printable character but whitespace (values are single-spaced: the DSL is a line of
# words) — letters of every script, digits, punctuation like `C++`, `$`, `(`, quotes inside a word.
_QUOTES = "'\"`"
words = st.text(alphabet=st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=8)
_NONE_WORDS = {"none", "null", "undefined", "[missing]", "[missing information]"}


def _expressible(value: str) -> bool:
    """Values the line format can carry exactly: quotes at either end are read as quoting; None-words reset."""
    return value[0] not in _QUOTES and value[-1] not in _QUOTES and value.lower() not in _NONE_WORDS


slot_values = st.one_of(
    st.lists(words, min_size=1, max_size=5).map(" ".join),
    st.sampled_from(
        [
            "C++",
            "New York",
            "50$",
            "what?",
            "Zürich",
            "東京 駅",
            "O'Brien",
            'the "big" one',
            "a (b)",
            "f(x) = 1,2",
            "40",
            "-3.5",
            "True",
            "12:30",
        ]
    ),
).filter(_expressible)

_BARE = [
    CancelFlow(),
    ChitChat(),
    Knowledge(),
    SkipQuestion(),
    RepeatLastBotMessages(),
    HumanHandoff(),
    CannotHandle(),
    ContinueAgent(),
]
commands = st.one_of(
    flow_ids.map(StartFlow),
    st.builds(SetSlot, slot_names, slot_values),
    st.lists(flow_ids, max_size=4).map(lambda options: Clarify(tuple(options))),
    flow_ids.map(RestartAgent),
    st.sampled_from(_BARE),
)

# The short DU dialect only has words for these; anything else is printed the v2 way and is not short syntax.
_SHORT_KINDS = (StartFlow, SetSlot, Clarify, CancelFlow, ChitChat, Knowledge, SkipQuestion)


def syntaxes_for(command: Command) -> list[Syntax]:
    return [s for s in ALL_SYNTAXES if s is not Syntax.SHORT or isinstance(command, _SHORT_KINDS)]


# ---------------------------------------------------------------------------------------------- fuzzing


@FUZZ
@given(st.text(), st.sampled_from(ALL_SYNTAXES))
def test_parse_command_raises_only_command_parse_error(text: str, syntax: Syntax):
    try:
        command = parse_command(text, [syntax])
    except CommandParseError as error:
        assert str(error)  # always says what was wrong
    else:
        assert isinstance(command, Command)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("SetSlot()StartFlow,set slot start flow clarify \"'`-*1.\n\t C++"))))
def test_parse_command_near_misses_raise_only_command_parse_error(text: str):
    # Text made of command fragments reaches far deeper into the parser than random unicode does.
    for syntax in ALL_SYNTAXES:
        try:
            parse_command(text, [syntax])
        except CommandParseError:
            pass


@FUZZ
@given(st.text(), st.sampled_from(ALL_SYNTAXES))
def test_parse_model_output_never_raises(text: str, syntax: Syntax):
    parsed = parse_model_output(text, syntax)
    assert parsed.fully_parsed == (not parsed.unparsed_lines)
    assert len(parsed.commands) + len(parsed.unparsed_lines) <= len(text.splitlines())


@FUZZ
@given(st.text())
def test_detect_syntax_never_raises(text: str):
    assert detect_syntax(text) in (None, *ALL_SYNTAXES)


@FUZZ
@given(commands)
def test_round_trip_in_every_syntax_that_can_express_the_command(command: Command):
    for syntax in syntaxes_for(command):
        line = format_command(command, syntax)
        assert "\n" not in line
        assert parse_command(line, [syntax]) == command, (syntax, line)


@FUZZ
@given(st.lists(commands, max_size=6), st.sampled_from([Syntax.V1, Syntax.V2, Syntax.V3]))
def test_model_output_round_trip(batch: list[Command], syntax: Syntax):
    parsed = parse_model_output(format_commands(batch, syntax), syntax)
    assert parsed.fully_parsed
    assert list(parsed.commands) == batch


@FUZZ
@given(slot_names, slot_values)
def test_set_slot_value_kept_exactly(slot: str, value: str):
    # Unlike the runtime (which strips trailing punctuation: `C++` -> `C`), values survive unchanged.
    for syntax in ALL_SYNTAXES:
        assert parse_command(format_command(SetSlot(slot, value), syntax), [syntax]).value == value


# ---------------------------------------------------------------------------------------------- tolerant parsing


@pytest.mark.parametrize(
    "line",
    [
        "- start flow book_hotel",
        "1. start flow book_hotel",
        "* start flow book_hotel",
        "`start flow book_hotel`",
        '"start flow book_hotel"',
        "'start flow book_hotel'",
        "  start   flow    book_hotel  ",
        "2) start flow book_hotel",
        "- `start flow book_hotel`",
    ],
)
def test_bullets_numbers_quotes_and_spaces_are_tolerated(line: str):
    assert parse_command(line, [Syntax.V2]) == StartFlow("book_hotel")


def test_v1_bullets_tolerated():
    assert parse_command("- SetSlot(city, Lisbon)", [Syntax.V1]) == SetSlot("city", "Lisbon")


@pytest.mark.parametrize(
    "line",
    ["Start flow book_hotel", "START FLOW book_hotel", "Set slot city Lisbon", "startflow(book_hotel)", "Cancel flow"],
)
def test_keywords_are_case_sensitive(line: str):
    with pytest.raises(CommandParseError):
        parse_command(line)


@pytest.mark.parametrize(
    "line",
    [
        "start flow book_hotel please",
        "start flow book_hotel now.",
        "cancel flow now",
        "StartFlow(book_hotel) please",
        "skip question ok",
    ],
)
def test_trailing_junk_is_rejected(line: str):
    with pytest.raises(CommandParseError):
        parse_command(line)


def test_cplusplus_value_is_kept():
    assert parse_command("SetSlot(language, C++)") == SetSlot("language", "C++")
    assert parse_command("set slot language C++") == SetSlot("language", "C++")
    assert parse_command("set language C++", [Syntax.SHORT]) == SetSlot("language", "C++")


def test_v1_value_with_parentheses_and_commas():
    assert parse_command("SetSlot(note, call me (after 5), thanks)") == SetSlot("note", "call me (after 5), thanks")


@pytest.mark.parametrize("line", ["set x None", "set x null", "set x", "set x [missing]"])
def test_short_dialect_none_resets(line: str):
    assert parse_command(line, [Syntax.SHORT]) == SetSlot("x", None)


def test_none_resets_in_every_dialect():
    assert parse_command("SetSlot(x, None)") == SetSlot("x", None)
    assert parse_command("set slot x undefined") == SetSlot("x", None)
    assert parse_command('set slot x "null"') == SetSlot("x", None)


def test_short_dialect_values_may_contain_spaces():
    assert parse_command("set hotel_checkin_date 17 October", [Syntax.SHORT]) == SetSlot(
        "hotel_checkin_date", "17 October"
    )


def test_quoted_values_and_identifiers_are_unquoted():
    assert parse_command("SetSlot('city', 'New York')") == SetSlot("city", "New York")
    assert parse_command('set slot city "New York"') == SetSlot("city", "New York")
    assert parse_command("StartFlow('book_hotel')") == StartFlow("book_hotel")


@pytest.mark.parametrize(
    "line",
    [
        "Clarify(b_flow, a_flow)",
        "disambiguate flows b_flow a_flow",
        "clarify b_flow a_flow",
        "Clarify(b_flow,a_flow, b_flow)",
    ],
)
def test_clarify_options_sorted_and_deduplicated(line: str):
    assert parse_command(line).options == ("a_flow", "b_flow")


def test_clarify_prints_sorted_options():
    assert format_command(Clarify(("z", "a", "m")), Syntax.V2) == "disambiguate flows a m z"
    assert format_command(Clarify(("z", "a")), Syntax.V1) == "Clarify(a, z)"


def test_invalid_identifiers_are_rejected():
    for line in ["StartFlow(book hotel)", "start flow book.hotel", "SetSlot(1city, x)", "set slot ci$ty x"]:
        with pytest.raises(CommandParseError):
            parse_command(line)


def test_syntax_restriction_is_honoured():
    with pytest.raises(CommandParseError, match="v2 syntax"):
        parse_command("StartFlow(book_hotel)", [Syntax.V2])
    with pytest.raises(CommandParseError):
        parse_command("start flow book_hotel", [Syntax.SHORT])


# ---------------------------------------------------------------------------------------------- detect_syntax


@pytest.mark.parametrize(
    "line, syntax",
    [
        ("StartFlow(book_hotel)", Syntax.V1),
        ("SearchAndReply()", Syntax.V1),
        ("SetSlot(city, Lisbon)", Syntax.V1),
        ("start flow book_hotel", Syntax.V2),
        ("provide info", Syntax.V2),
        ("set slot city Lisbon", Syntax.V2),
        ("offtopic reply", Syntax.V2),
        ("disambiguate flows a b", Syntax.V2),
        ("search and reply", Syntax.V3),
        ("start book_hotel", Syntax.SHORT),
        ("set city Lisbon", Syntax.SHORT),
        ("chat", Syntax.SHORT),
        ("search", Syntax.SHORT),
        ("skip", Syntax.SHORT),
        ("clarify a b", Syntax.SHORT),
        ("cancel", Syntax.SHORT),
        ("book a hotel", None),
        ("", None),
    ],
)
def test_detect_syntax(line: str, syntax: Syntax | None):
    assert detect_syntax(line) is syntax


# ---------------------------------------------------------------------------------------------- model output


def test_model_output_skips_blank_lines_and_fences_and_keeps_unparsed_lines():
    parsed = parse_model_output("```\nstart flow book_hotel\n\nset slot city Lisbon\nI think so\n```", Syntax.V2)
    assert parsed.commands == (StartFlow("book_hotel"), SetSlot("city", "Lisbon"))
    assert parsed.unparsed_lines == ("I think so",)
    assert not parsed.fully_parsed


def test_model_output_v2_and_v3_read_each_others_knowledge_words():
    assert parse_model_output("search and reply", Syntax.V2).commands == (Knowledge(),)
    assert parse_model_output("provide info", Syntax.V3).commands == (Knowledge(),)
    assert parse_model_output("StartFlow(x)", Syntax.V2).unparsed_lines == ("StartFlow(x)",)


# ---------------------------------------------------------------------------------------------- comparing


def same_commands(expected, predicted) -> bool:
    """Multiset equality by `command_key`, as validation and evaluation compare a turn's commands."""
    return Counter(map(command_key, expected)) == Counter(map(command_key, predicted))


def test_same_commands_is_multiset_equality():
    a, b = StartFlow("a"), StartFlow("b")
    assert not same_commands([a, a], [a, b])
    assert not same_commands([a], [a, a])
    assert same_commands([a, b], [b, a])
    assert same_commands([], [])


def test_same_commands_case_folds_slot_values_only():
    assert same_commands([SetSlot("city", "Lisbon")], [SetSlot("city", "lisbon")])
    assert same_commands([SetSlot("city", "New  York")], [SetSlot("city", "new york")])
    assert not same_commands([SetSlot("city", "Lisbon")], [SetSlot("City", "Lisbon")])
    assert not same_commands([StartFlow("Book")], [StartFlow("book")])
    assert not same_commands([SetSlot("city", None)], [SetSlot("city", "None ")])


def test_as_dict_matches_the_json_form():
    assert SetSlot("amount", "40").as_dict() == {
        "command": "set slot",
        "name": "amount",
        "value": "40",
        "extractor": "LLM",
    }
    assert StartFlow("send_money").as_dict() == {"command": "start flow", "flow": "send_money"}
    assert Clarify(("b", "a")).as_dict() == {"command": "clarify", "options": ["a", "b"]}
