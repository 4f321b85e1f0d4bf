"""Corrections, pattern context and responses as the Rasa Pro runtime does them, on an assistant written like a real
project (tests/data/runtime_semantics/transfers): a `pattern_correction` override that confirms a corrected amount,
a `pattern_cancel_flow` override that branches on `context.canceled_name`, conditional response variations and
Jinja responses. Each test replays an E2E test of that project and checks the tracker's transcript, slots and the
prompt of the next turn against the test's own bot turns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe.commands import SetSlot, StartFlow
from recipe.conditions import evaluate
from recipe.conversation import Turn, replay_test_case
from recipe.project import Project, load_project
from recipe.prompt import prompt_variables
from recipe.testcases import all_test_cases, load_tests
from recipe.tracker import (
    DEFAULT_RESPONSES,
    JINJA_DEFAULT_RESPONSES,
    DialogueTracker,
    choose_variation,
    render_response,
    render_text,
)
from recipe.types import ResponseVariation

ROOT = Path(__file__).parent / "data" / "runtime_semantics" / "transfers"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(ROOT)


def replay(project: Project, name: str) -> list[Turn]:
    cases = {case.name: case for case in all_test_cases(load_tests([str(ROOT / "e2e_tests")], project))}
    turns = replay_test_case(project, cases[name])
    for turn in turns:
        assert turn.warnings == [], turn.warnings  # the flows say what the test says
    return turns


def said(turn: Turn) -> list[tuple[str | None, str | None]]:
    return [(m.utter, m.text) for m in turn.bot_messages]


def flow_slot(project: Project, turn: Turn, name: str) -> str | None:
    variables = prompt_variables(project, turn.state, turn.text, None)
    return next(entry["value"] for entry in variables["flow_slots"] if entry["name"] == name)


# ---------------------------------------------------------------------------------------------- corrections


def test_a_declined_correction_keeps_the_old_value_and_the_flow_where_it_was(project):
    _, correction, declined, confirmed = replay(project, "a corrected amount is declined and the old one stays")
    assert said(correction) == [("utter_ask_confirm_slot_correction", "Change the amount to 80.0?")]
    # the correction waits for the confirmation: the slot is unchanged meanwhile, and the question is the pattern's
    assert correction.slots_after["amount"] == 50.0
    variables = prompt_variables(project, declined.state, declined.text, None)
    assert variables["current_flow"] == "pattern_correction"
    assert variables["current_slot"] == "confirm_slot_correction"
    assert said(declined) == [
        ("utter_not_corrected_previous_input", "Okay, I kept what you said before."),
        ("utter_ask_confirm_transfer", "Send 50.0 to Mia?"),
    ]
    assert declined.slots_after["amount"] == 50.0 and "confirm_slot_correction" not in declined.slots_after
    # the next prompt shows the old value, and the transfer asks its question again
    assert confirmed.state.slots["amount"] == 50.0
    assert "50" in str(flow_slot(project, confirmed, "amount"))
    assert confirmed.state.stack[-1].flow_id == "transfer_money"
    assert said(confirmed) == [("utter_transfer_done", "Sent 50.0 to Mia.")]
    assert ("amount", 80.0) not in [s for t in (correction, declined) for s in t.events.slots_set]


def test_a_confirmed_correction_is_applied_by_action_correct_flow_slot(project):
    _, correction, accepted, last = replay(project, "a corrected amount is confirmed and applied")
    assert correction.slots_after["amount"] == 50.0  # not yet
    assert "action_correct_flow_slot" in accepted.events.actions
    assert ("amount", 80.0) in accepted.events.slots_set
    assert said(accepted) == [
        ("utter_corrected_previous_input", "Done, the amount is now 80.0."),
        ("utter_ask_confirm_transfer", "Send 80.0 to Mia?"),
    ]
    assert last.state.slots["amount"] == 80.0 and "80" in str(flow_slot(project, last, "amount"))
    assert said(last) == [("utter_transfer_done", "Sent 80.0 to Mia.")]


def test_the_override_branches_on_context_corrected_slots(project):
    _, correction = replay(project, "a corrected recipient is applied without asking")
    # not the amount: applied at once, as the default pattern does
    assert said(correction) == [
        ("utter_corrected_previous_input", "Done, the recipient is now Leo."),
        ("utter_ask_confirm_transfer", "Send 50.0 to Leo?"),
    ]
    assert correction.slots_after["recipient"] == "Leo"


def test_a_reset_only_correction_rewinds_to_the_question(project):
    _, answered, corrected = replay(project, "a card type asked before filling is asked again")
    assert answered.slots_after["card_type"] == "debit"
    # every collect step of card_type asks before filling: the flow goes back to that question, no confirmation
    assert said(corrected) == [("utter_ask_card_type", "Debit or credit?")]
    assert corrected.bot_messages[0].buttons[1].payload == "/SetSlots(card_type=credit)"
    assert "card_type" not in corrected.slots_after
    assert "utter_corrected_previous_input" not in [m.utter for m in corrected.events.bot_messages]


def test_the_default_correction_pattern_applies_at_once_and_a_reset_says_nothing(project, tmp_path):
    (tmp_path / "flows").mkdir()
    flows = (ROOT / "flows" / "transfers.yml").read_text(encoding="utf-8")
    (tmp_path / "flows" / "flows.yml").write_text(flows, encoding="utf-8")  # no pattern overrides
    (tmp_path / "domain.yml").write_text((ROOT / "domain.yml").read_text(encoding="utf-8"), encoding="utf-8")
    plain = load_project(tmp_path)
    tracker = DialogueTracker(plain)
    tracker.user_turn(
        "send 50 to Mia", [StartFlow("transfer_money"), SetSlot("recipient", "Mia"), SetSlot("amount", "50")]
    )
    events = tracker.user_turn("make it 80", [SetSlot("amount", "80")])
    assert tracker.slots["amount"] == 80.0
    assert [m.utter for m in events.bot_messages] == ["utter_corrected_previous_input", "utter_ask_confirm_transfer"]
    frame_context = tracker.stack[-1]  # the correction pattern is done; the transfer asks again
    assert frame_context.flow_id == "transfer_money"

    tracker = DialogueTracker(plain)
    tracker.user_turn("a card", [StartFlow("order_card")])
    tracker.user_turn("debit", [SetSlot("card_type", "debit")])
    events = tracker.user_turn("credit after all", [SetSlot("card_type", "credit")])
    assert [m.utter for m in events.bot_messages] == ["utter_ask_card_type"]  # `not context.is_reset_only` is false


# ---------------------------------------------------------------------------------------------- pattern context


def test_a_cancel_override_branches_on_context_canceled_name(project):
    _, cancelled = replay(project, "cancelling the transfer names it")
    assert said(cancelled) == [("utter_no_money_sent", "Okay, no money was sent.")]
    assert cancelled.events.flows_cancelled[0][0] == "transfer_money"


def test_pattern_frames_carry_the_runtime_context(project):
    tracker = DialogueTracker(project)
    tracker.user_turn(
        "send 50 to Mia", [StartFlow("transfer_money"), SetSlot("recipient", "Mia"), SetSlot("amount", "50")]
    )
    tracker.user_turn("make it 80", [SetSlot("amount", "80")])
    frame = tracker.stack[-1]
    assert frame.flow_id == "pattern_correction"
    assert frame.context["is_reset_only"] is False
    assert frame.context["corrected_slots"] == {"amount": {"value": 80.0, "filled_by": None}}
    assert frame.context["new_slot_values"] == [80.0]
    assert frame.context["reset_flow_id"] == "transfer_money"
    assert frame.context["reset_step_id"] == project.flows["transfer_money"].collect_steps()[1].id
    # conditions see it as `context.*`, nested keys included; the question's context is the pattern's plus collect keys
    context = tracker._frame_context(frame)
    assert context["collect"] == "confirm_slot_correction" and context["flow_id"] == "pattern_correction"
    assert evaluate("context.corrected_slots.amount.value > 60 and not context.is_reset_only", tracker.slots, context)
    assert not evaluate("context.corrected_slots.recipient", tracker.slots, context)


def test_conditions_read_context_keys_and_render_jinja_first():
    context = {"collect": "amount", "names": ["send money", "order a card"], "reason": None, "info": {"n": 3}}
    assert evaluate("slots.{{context.collect}} is not null", {"amount": 5}, context)
    assert not evaluate("slots.{{context.collect}} is not null", {}, context)
    assert evaluate('context.names contains "order a card"', {}, context)
    assert evaluate("context.reason is null and context.info.n = 3", {}, context)
    assert evaluate("context.missing.deeper is null", {}, context)
    assert evaluate("slots.a = 1", {"a": 1})  # slot-only conditions as before


# ---------------------------------------------------------------------------------------------- responses


def test_conditional_variations_are_chosen_by_the_slots(project):
    _, premium = replay(project, "premium members hear the premium variation")
    assert said(premium) == [("utter_transfer_done", "Sent 20.0 to Mia, free of charge for premium members.")]
    _, large = replay(project, "a large transfer hears the large variation first")
    # both conditions hold: the first in file order is said
    assert large.bot_messages[0].text == "That is a large transfer; it is on its way to Mia and arrives tomorrow."
    # no condition holds: the unconditional variation
    variations = project.domain.responses["utter_transfer_done"]
    assert choose_variation(variations, {"amount": 5.0, "membership": "basic"}) == variations[2]


def test_variation_choice_prefers_conditional_then_drops_other_channels():
    conditional = ResponseVariation("c", condition=(("tier", "gold"),))
    default = ResponseVariation("d")
    other_channel = ResponseVariation("slack only", channel="slack")
    assert choose_variation([default, conditional], {"tier": "GOLD"}) is conditional  # strings without case
    assert choose_variation([other_channel, default, conditional], {"tier": "silver"}) is default
    assert choose_variation([other_channel], {}) is None  # the runtime then says utter_internal_error_rasa
    assert choose_variation([other_channel, default], {}, channel="slack") is other_channel
    assert choose_variation([ResponseVariation("u", condition="slots.n >"), default], {"n": 1}) is default


def test_jinja_response_renders_slots_by_name_and_context(project):
    _, ordered = replay(project, "a card order renders its jinja response")
    assert said(ordered) == [("utter_card_ordered", "Your credit card is on its way to Porto, express.")]
    message = render_response(project, "utter_card_ordered", {"delivery_city": "Faro"})
    assert message is not None and message.text == "Your None card is on its way to Faro."  # unset: None


def test_placeholders_render_as_the_runtime_does():
    assert render_text("Send {amount} to {recipient}?", {"amount": 5.0, "recipient": None}) == "Send 5.0 to None?"
    # one unknown name: the runtime leaves the whole text unfilled
    assert render_text("{amount} for {nobody}", {"amount": 5.0}) == "{amount} for {nobody}"
    assert render_text("{{ context.x }} and {{ nobody }}.", {"context": {"x": 1}}, jinja=True) == "1 and ."
    assert render_text("{% if %}", {}, jinja=True) == "{% if %}"  # a broken template is sent as written


@pytest.mark.parametrize("utter", sorted(JINJA_DEFAULT_RESPONSES))
def test_builtin_rejection_texts_say_the_rejected_value(project, utter):
    message = render_response(project, utter, {}, extra={"value": "purple"})
    assert message is not None and "purple" in (message.text or "")
    assert "{{" in DEFAULT_RESPONSES[utter]
