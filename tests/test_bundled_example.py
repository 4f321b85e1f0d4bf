"""The bundled Wayfarer example replayed through annotator and tracker: every test case, every turn.

* every user turn gets commands (DU tests keep the ones they are written with);
* the tracker's events agree with every assertion and slot check the tests make (rasa-formats.md §4.2, §4.3);
* for DU tests, whose bot lists are complete (§4.4), the bot messages the test lists after each user turn are
  exactly the ones the tracker simulates, and the only warnings are about custom actions without a stub;
* for classic E2E tests every listed message is among the simulated ones, in order (extra ones are allowed, §4.2);
* hand-checked states at turns that matter for prompts (after a correction, a cancel, a digression, a link, ...).
"""

from __future__ import annotations

from functools import cache, lru_cache

import pytest

from recipe.annotate import annotate_from_assertions
from recipe.conversation import assertion_problems, mocked_datetime, replay_test_case
from recipe.project import load_project
from recipe.testcases import all_test_cases, load_tests
from recipe.tracker import GENERATED_ACTIONS, GENERATED_ANSWER, startable_flows
from recipe.types import BotStep, UserStep

GENERATED_PLACEHOLDER = "placeholder_generated_answer"  # a DU test's stand-in for any generated answer


@lru_cache(maxsize=1)
def _example():
    from pathlib import Path

    from recipe.commands import RasaVersion

    root = Path(__file__).resolve().parent.parent
    project = load_project(root)
    # The example's tests hand over to a human, which Rasa Pro parses up to 3.15 (tests/test_rasa_versions.py
    # checks what 3.16+ does with those turns): the tracker is checked against every turn here.
    project.rasa_version = RasaVersion(3, 15)
    cases = all_test_cases(load_tests([str(root / "e2e_tests")], project))
    return project, {case.id.split("e2e_tests/", 1)[1]: case for case in cases}


@cache
def _replayed(case_id: str):
    project, cases = _example()
    case = cases[case_id]
    annotation = annotate_from_assertions(project, case)
    return case, annotation, replay_test_case(project, case, annotation.commands_for)


def _turn(case_id: str, number: int):
    return _replayed(case_id)[2][number - 1]


CASE_IDS = sorted(_example()[1])


def _is_du(case) -> bool:
    return any(step.commands is not None for step in case.user_steps)


def _listed_bot_steps(case, turn) -> list[BotStep]:
    listed = []
    for step in case.steps[turn.step_index + 1 :]:
        if isinstance(step, UserStep):
            break
        if isinstance(step, BotStep):
            listed.append(step)
    return listed


def _matches(step: BotStep, message) -> bool:
    if step.utter == GENERATED_PLACEHOLDER:
        return message.text == GENERATED_ANSWER and message.utter in GENERATED_ACTIONS
    if step.utter:
        return message.utter == step.utter
    return message.text == step.text


def test_the_example_has_all_its_tests():
    project, cases = _example()
    assert len(cases) == 46
    assert sum(_is_du(case) for case in cases.values()) == 37


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_every_turn_annotated_and_consistent_with_the_tests_expectations(case_id):
    case, annotation, turns = _replayed(case_id)
    assert len(annotation.turns) == len(case.user_steps) == len(turns)
    for step, turn_annotation, turn in zip(case.user_steps, annotation.turns, turns):
        assert turn_annotation.commands is not None, f"turn {turn.number}: {turn_annotation.reason}"
        if step.commands is not None:
            assert turn_annotation.source == "test" and turn_annotation.commands == step.commands
        assert turn.commands == turn_annotation.commands
        assert assertion_problems(turn) == [], f"turn {turn.number}"
        listed = _listed_bot_steps(case, turn)
        simulated = turn.events.bot_messages
        if _is_du(case):
            where = (
                f"turn {turn.number}: listed {[s.utter or s.text for s in listed]}, "
                f"simulated {[m.utter or m.text for m in simulated]}"
            )
            assert len(listed) == len(simulated), where
            assert all(_matches(s, m) for s, m in zip(listed, simulated)), where
            assert all("no stub" in warning for warning in turn.warnings), turn.warnings
        else:
            remaining = iter(simulated)
            assert all(any(_matches(s, m) for m in remaining) for s in listed), f"turn {turn.number}"
            assert turn.warnings == []


# ---------------------------------------------------------------------------------------------- states by hand


def _stack(turn) -> list[tuple[str, str]]:
    return [(frame.flow_id, frame.step_id) for frame in turn.state.stack]


def test_correction_state():
    case = "hotels/hotel_du.yml::correct the number of nights"
    correction = _turn(case, 4)
    assert "pattern_correction" in correction.events.flows_started
    after = _turn(case, 5).state
    assert _stack(_turn(case, 5)) == [("book_hotel", "book_hotel_4_collect_room_type")]
    assert after.slots["num_nights"] == 5.0 and after.slots["num_guests"] == 3.0
    assert after.slots["hotel_city"] == "Kraków" and after.slots["hotel_checkin_date"] == "12 May"
    assert [line.text for line in after.transcript[-2:]] == [
        "Got it, I've updated that.",
        "What kind of room would you like?",
    ]
    assert [b.title for b in after.transcript[-1].buttons] == ["Single", "Double", "Twin", "Suite"]


def test_cancel_state():
    case = "hotels/hotel_du.yml::small talk and then cancel the hotel search"
    assert _turn(case, 3).events.flows_cancelled[0][0] == "book_hotel"
    after = _turn(case, 4).state
    assert after.stack == ()
    assert "hotel_city" not in after.slots  # the cancelled flow's slots are reset
    assert after.transcript[-1].text == "No problem, I've stopped that. Nothing was booked or changed."


def test_digression_state():
    case = "hotels/hotel_du.yml::book a food tour in the middle of a hotel booking"
    assert _stack(_turn(case, 3)) == [
        ("book_hotel", "book_hotel_2_collect_num_nights"),
        ("book_excursion", "book_excursion_3_collect_num_participants"),
    ]
    resumed = _turn(case, 4)
    assert _stack(resumed) == [("book_hotel", "book_hotel_2_collect_num_nights")]
    assert "excursion_city" not in resumed.state.slots and resumed.state.slots["hotel_city"] == "Rome"
    assert [line.text for line in resumed.state.transcript[-3:]] == [
        "Your excursion is booked. The tickets will arrive by email.",
        "Now, back to what we were doing before.",
        "How many nights will you stay?",
    ]


def test_call_state_and_button_payload():
    case = "cars/rental_car_du.yml::car rental step by step with buttons"
    payload_turn = _turn(case, 5)
    assert payload_turn.is_payload and payload_turn.commands == []
    state = _turn(case, 6).state
    assert state.slots["car_type"] == "compact"
    assert [(f.flow_id, f.kind) for f in state.stack] == [
        ("book_rental_car", "user"),
        ("collect_driver_details", "called"),
    ]
    assert state.stack[-1].step_id == "collect_driver_details_0_collect_driver_name"


def test_link_state():
    case = "e2e/assertion_checks.yml::assert hotel booking and insurance offer"
    state = _turn(case, 5).state
    assert _stack(_turn(case, 5)) == [("offer_travel_insurance", "offer_travel_insurance_0_collect_wants_insurance")]
    assert "hotel_city" not in state.slots  # book_hotel ended with the link
    assert _turn(case, 4).commands == [c for c in _turn(case, 4).commands if c.kind != "start flow"]


def test_clarification_state():
    case = "e2e/assertion_checks.yml::assert clarification of a vague booking request"
    assert _turn(case, 1).events.clarification_options == ["book_excursion", "book_hotel", "book_rental_car"]
    during = _turn(case, 2).state
    assert during.stack == ()
    assert during.transcript[-1].text == "I can help with a few different things there. Which one did you mean?"


def test_guards_follow_the_fixtures():
    project, _ = _example()
    guest = _turn("flights/flight_change_du.yml::guest user asks to change a flight", 1).state
    member = _turn("flights/flight_change_du.yml::free flight change step by step", 1).state
    assert guest.slots["user_logged_in"] is False and member.slots["user_logged_in"] is True
    guest_flows = {flow.id for flow in startable_flows(project, guest.slots)}
    member_flows = {flow.id for flow in startable_flows(project, member.slots)}
    assert "change_flight" not in guest_flows and "explain_login" in guest_flows
    assert "change_flight" in member_flows and "explain_login" not in member_flows
    assert "offer_travel_insurance" not in guest_flows | member_flows  # `if: False`
    assert "collect_driver_details" not in guest_flows | member_flows


def test_repeat_in_a_collect_asks_once():
    turn = _turn("cars/rental_car_du.yml::repeat and knowledge question in a van rental", 2)
    assert [m.utter for m in turn.events.bot_messages] == ["utter_ask_car_pickup_date"]


def test_mocked_datetime_is_a_fixture_not_a_slot():
    case_id = "hotels/hotel_du.yml::hotel step by step with a pinned date"
    case, _, turns = _replayed(case_id)
    assert mocked_datetime(case) == "2026-03-05T14:05:09"
    assert "mocked_datetime" not in turns[0].state.slots
