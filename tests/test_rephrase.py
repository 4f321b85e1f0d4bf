"""Rephrasing, value normalisation, validation and split: the pieces of prepare-data, one by one."""

from __future__ import annotations

import pytest

from recipe.commands import SetSlot, StartFlow
from recipe.prompt import PromptRenderer, PromptTemplate
from recipe.rephrase import (
    MessageToRephrase,
    clean_candidates,
    parse_rephrasings,
    rephrase_prompt,
    rule_based_rephrasings,
)
from recipe.split import coverage_features, split_test_cases
from recipe.textnorm import contains_value, normalize_value
from recipe.validate import difference, validate_lexically

MESSAGES = [MessageToRephrase(1, 1, "I need a hotel in Lisbon"), MessageToRephrase(2, 3, "for 3.5 nights")]


def test_json_answers_are_read_by_id_and_by_position_when_ids_are_missing():
    by_id = 'Sure! {"rephrasings": [{"id": 2, "texts": ["three and a half nights"]}, {"id": 1, "texts": ["Lisbon"]}]}'
    assert parse_rephrasings(by_id, MESSAGES) == {3: ["three and a half nights"], 1: ["Lisbon"]}
    by_position = '```json\n{"rephrasings": [{"texts": ["a room in Lisbon"]}, {"texts": ["3.5 nights"]}]}\n```'
    assert parse_rephrasings(by_position, MESSAGES) == {1: ["a room in Lisbon"], 3: ["3.5 nights"]}


def test_numbered_text_is_read_block_by_block_and_one_bad_block_loses_nothing_else():
    answer = (
        "USER: i need a hotel in lisbon!\n1) Find me a Lisbon hotel\n2. Lisbon hotel please\n\n"
        "USER: something the model made up\nnot numbered at all\n\n"
        "USER: For 3.5 nights\n- 3.5 nights, please\n3.5 kg of luggage\n"
    )
    parsed = parse_rephrasings(answer, MESSAGES)
    assert parsed[1] == ["Find me a Lisbon hotel", "Lisbon hotel please"]  # `1)` numbering leaves no `)`
    assert parsed[3] == ["3.5 nights, please"]  # a leading number in the text itself is not numbering


def test_copies_of_the_original_and_duplicates_are_dropped_and_the_count_is_capped():
    kept = clean_candidates("Book it.", ["book it", "Book it!", "Reserve it", "reserve it.", "", "Go ahead", "Yes"], 2)
    assert kept == ["Reserve it", "Go ahead"]


def test_a_rasa_style_rephrase_template_looping_over_plain_strings_renders_the_texts():
    template = PromptTemplate(
        "{{ test_case_name }}: {{ number_of_rephrasings }} each\n"
        "{% for message in user_messages %}{{ user_prefix }}: {{ message }}\n{% endfor %}",
        "rasa_style.jinja2",
    )
    prompt = rephrase_prompt(PromptRenderer(template), "book", "USER: hi", MESSAGES, 5)
    assert prompt == "book: 5 each\nUSER: I need a hotel in Lisbon\nUSER: for 3.5 nights\n"


def test_offline_variants_keep_every_value_exactly_and_include_voice_channel_forms():
    text = "I would like a hotel in São Paulo for 2 nights, reference WF-48213."
    values = ["São Paulo", "2", "WF-48213"]
    variants = rule_based_rephrasings(text, 10, seed=1, values=values)
    assert len(variants) >= 5 and text not in variants and len(set(variants)) == len(variants)
    assert all("São Paulo" in v and "WF-48213" in v for v in variants)  # spelled as written: the label copies it
    assert all(contains_value(v, "2") for v in variants)
    assert any(v.startswith("i would") and "," not in v and "." not in v for v in variants)  # voice: lower case
    assert any("two nights" in v for v in variants)  # spoken numbers
    assert rule_based_rephrasings(text, 10, seed=1, values=values) == variants  # seeded


@pytest.mark.parametrize(
    "text, bad",
    [
        ("Do I need a visa for Brazil?", "I'd like a visa"),  # swaps only at the start of the message
        ("no preference, skip this", "nope preference"),
        ("twin beds please", "please please"),
        ("is a second driver included in the price?", "thank you?"),
        ("a tour on Sunday 22 March", "twenty-two March"),  # numbers inside values stay as written
        ("at 14:05 on 3/4", "fourteen"),
    ],
)
def test_offline_variants_do_not_break_the_sentence(text, bad):
    values = ["Sunday 22 March"] if "March" in text else []
    assert all(bad not in v for v in rule_based_rephrasings(text, 10, seed=5, values=values, first_turn=False))


def test_greetings_open_only_the_first_message():
    later = rule_based_rephrasings("a double room", 10, seed=2, first_turn=False)
    assert not any(v.startswith(("Hi,", "Hello,", "Hey,")) for v in later)


@pytest.mark.parametrize(
    "a, b",
    [
        ("Forty euros", "40"),
        ("€40.00", "40 EUR"),
        ("1,200", "1200"),
        ("New  York", "new york"),
        ("boat_trip", "Boat trip"),
        ("twenty-one", "21"),
    ],
)
def test_values_that_say_the_same_thing_normalise_alike(a, b):
    assert normalize_value(a) == normalize_value(b)


@pytest.mark.parametrize("a, b", [("40", "50"), ("São Paulo", "Sao Paulo"), ("C++", "C"), ("3.5", "35")])
def test_values_that_differ_stay_different(a, b):
    assert normalize_value(a) != normalize_value(b)


def test_strict_comparison_is_a_multiset_of_normalised_values():
    expected = [StartFlow("book_hotel"), SetSlot("num_nights", "3")]
    assert difference(expected, [SetSlot("num_nights", "three"), StartFlow("book_hotel")]) is None
    assert "missing" in difference(expected, [StartFlow("book_hotel"), SetSlot("num_nights", "4")])
    assert difference(expected, [StartFlow("book_hotel"), SetSlot("num_nights", "4")], with_values=False) is None
    assert difference([StartFlow("a"), StartFlow("a")], [StartFlow("a"), StartFlow("b")]) is not None


def test_the_lexical_check_wants_every_value_the_original_states():
    expected = [StartFlow("book_hotel"), SetSlot("hotel_city", "Lisbon"), SetSlot("confirm", "True")]
    assert validate_lexically("a hotel in Lisbon", "Lisbon hotel, please", expected).passed
    failed = validate_lexically("a hotel in Lisbon", "a hotel in Porto", expected)
    assert not failed.passed and "Lisbon" in failed.reason and failed.check == "lexical"


def test_the_split_covers_every_feature_in_train_and_respects_the_fraction():
    features = {
        "t1": coverage_features([StartFlow("a"), SetSlot("x", "1")]),
        "t2": coverage_features([StartFlow("a")]),
        "t3": coverage_features([StartFlow("b"), SetSlot("y", "2")]),
        "t4": coverage_features([StartFlow("a")]),
        "t5": coverage_features([StartFlow("a")]),
    }
    split = split_test_cases(features, train_frac=0.6, seed=3)
    assert split.cover == ["t1", "t3"]
    assert len(split.train) == 3 and set(split.cover) <= set(split.train)
    assert sorted(split.train + split.validation) == sorted(features)
    assert split_test_cases(features, 0.6, 3) == split  # seeded
    assert split.validation_lacks == sorted({"flow:b", "slot:x", "slot:y", "type:set slot"})
    assert split_test_cases(features, 1.0, 3).validation == []
