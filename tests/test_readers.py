"""Reader details: how flows are flattened and numbered, what the domain keeps, and the annotated-conversation file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from recipe.commands import SetSlot, StartFlow
from recipe.domain import read_domain
from recipe.errors import InputError
from recipe.flows import read_flows_file
from recipe.testcases import load_annotated_conversations
from recipe.types import END, Branch, Flow
from recipe.yamlio import load_yaml


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def flows_of(tmp_path: Path, text: str) -> dict[str, Flow]:
    path = write(tmp_path, "flows.yml", text)
    return {flow.id: flow for flow in read_flows_file(path, load_yaml(path), "flows.yml")}


def targets(flow: Flow, step_id: str) -> list[tuple[str | None, str]]:
    return [(branch.condition, branch.target) for branch in flow.steps[step_id].next]


BRANCHING = """
    flows:
      pay:
        description: Pay a bill.
        if: slots.logged_in
        steps:
          - noop: true
            next:
              - if: slots.amount > 100
                then:
                  - action: utter_big
                  - collect: confirm
                    description: yes or no
              - else:
                  - action: utter_small
                    next: done
          - collect: amount
          - id: done
            action: utter_done
    """


def test_positional_ids_are_numbered_depth_first(tmp_path):
    flow = flows_of(tmp_path, BRANCHING)["pay"]
    assert list(flow.steps) == [
        "pay_0_noop",
        "pay_1_action_utter_big",
        "pay_2_collect_confirm",
        "pay_3_action_utter_small",
        "pay_4_collect_amount",
        "done",
    ]
    assert flow.first_step == "pay_0_noop"


def test_nested_branches_are_flattened(tmp_path):
    flow = flows_of(tmp_path, BRANCHING)["pay"]
    # A branch jumps to the first step of its list; within a list the steps follow each other.
    assert targets(flow, "pay_0_noop") == [
        ("slots.amount > 100", "pay_1_action_utter_big"),
        (None, "pay_3_action_utter_small"),
    ]
    assert targets(flow, "pay_1_action_utter_big") == [(None, "pay_2_collect_confirm")]
    assert targets(flow, "pay_3_action_utter_small") == [(None, "done")]  # explicit next kept


def test_end_of_a_nested_list_ends_the_flow_and_top_level_steps_follow_each_other(tmp_path):
    flow = flows_of(tmp_path, BRANCHING)["pay"]
    assert targets(flow, "pay_2_collect_confirm") == [(None, END)]
    assert targets(flow, "pay_4_collect_amount") == [(None, "done")]
    assert targets(flow, "done") == [(None, END)]


def test_collect_step_details_are_kept(tmp_path):
    flow = flows_of(tmp_path, BRANCHING)["pay"]
    confirm, amount = flow.steps["pay_2_collect_confirm"], flow.steps["pay_4_collect_amount"]
    assert (confirm.collect, confirm.description) == ("confirm", "yes or no")
    assert (amount.collect, amount.description) == ("amount", None)  # never an empty string
    assert [step.id for step in flow.collect_steps()] == ["pay_2_collect_confirm", "pay_4_collect_amount"]


def test_guards_are_kept_as_text_and_if_false_is_the_string_false(tmp_path):
    flows = flows_of(
        tmp_path,
        """
        flows:
          guarded:
            description: Only for logged-in users.
            if: slots.logged_in and slots.tier = "gold"
            steps: [{action: utter_hi}]
          child:
            description: Reached only by call or link.
            if: False
            steps: [{action: utter_hi}]
          open:
            description: No guard.
            steps: [{action: utter_hi}]
        """,
    )
    assert flows["guarded"].guard == 'slots.logged_in and slots.tier = "gold"'
    assert flows["child"].guard == "False"
    assert flows["open"].guard is None


def test_if_without_else_ends_the_flow_when_no_branch_holds(tmp_path):
    flow = flows_of(
        tmp_path,
        """
        flows:
          check:
            description: Check.
            steps:
              - action: action_check
                next:
                  - if: slots.ok
                    then: finish
              - id: finish
                action: utter_ok
        """,
    )["check"]
    assert flow.steps["check_0_action_action_check"].next == [Branch("slots.ok", "finish"), Branch(None, END)]


def test_link_must_be_last_and_ends_the_flow(tmp_path):
    flow = flows_of(
        tmp_path,
        """
        flows:
          a:
            description: Hands over to b.
            steps:
              - action: utter_a
              - link: b
          b:
            description: B.
            steps: [{action: utter_b}]
        """,
    )["a"]
    assert targets(flow, "a_1_link_b") == [(None, END)]
    with pytest.raises(InputError, match="must be the last step") as error:
        flows_of(
            tmp_path,
            """
            flows:
              a:
                description: Link in the middle.
                steps:
                  - link: b
                  - action: utter_a
            """,
        )
    assert error.value.line == 5  # the `- link: b` line


def test_link_inside_a_branch_may_end_that_branch(tmp_path):
    flow = flows_of(
        tmp_path,
        """
        flows:
          a:
            description: Links from a branch.
            steps:
              - noop: true
                next:
                  - if: slots.x
                    then:
                      - action: utter_x
                      - link: b
                  - else: END
          b:
            description: B.
            steps: [{action: utter_b}]
        """,
    )["a"]
    assert targets(flow, "a_2_link_b") == [(None, END)]
    assert targets(flow, "a_0_noop")[-1] == (None, END)


# ---------------------------------------------------------------------------------------------- domain


DOMAIN = """
    version: "3.1"
    slots:
      account_type:
        type: categorical
        values: [checking, savings, __other__]
        mappings: [{type: from_llm}]
      amount:
        type: float
        min_value: 0
        mappings: [{type: from_llm}]
      confirmed: {type: bool, mappings: [{type: controlled}]}
      note: {type: text}
      tags: {type: list, initial_value: [a, b], mappings: [{type: from_llm}]}
    responses:
      utter_ask_account_type:
        - text: From which account?
          buttons:
            - {title: Checking, payload: "/SetSlots(account_type=checking)"}
            - {title: Savings, payload: "/SetSlots(account_type=savings)"}
      utter_short: [Plain text variation]
    actions: [action_check_funds, {action_transfer: {send_domain: true}}]
    """


def test_domain_slots_types_and_values(tmp_path):
    path = write(tmp_path, "domain.yml", DOMAIN)
    domain = read_domain([path], {path: "domain.yml"})
    assert {name: slot.type for name, slot in domain.slots.items()} == {
        "account_type": "categorical",
        "amount": "float",
        "confirmed": "bool",
        "note": "text",
        "tags": "list",
    }
    assert domain.slots["account_type"].values == ("checking", "savings")  # `__other__` is a catch-all, not a value
    assert domain.slots["tags"].initial_value == ["a", "b"]
    assert domain.slots["account_type"].location.line == 3


def test_domain_mappings_decide_who_may_fill_a_slot(tmp_path):
    path = write(tmp_path, "domain.yml", DOMAIN)
    slots = read_domain([path], {path: "domain.yml"}).slots
    assert slots["amount"].llm_fillable
    assert slots["note"].llm_fillable  # no mappings at all: the LLM may fill it
    assert not slots["confirmed"].llm_fillable


def test_domain_responses_keep_buttons_and_actions_their_names(tmp_path):
    path = write(tmp_path, "domain.yml", DOMAIN)
    domain = read_domain([path], {path: "domain.yml"})
    (variation,) = domain.responses["utter_ask_account_type"]
    assert variation.text == "From which account?"
    assert [(b.title, b.payload) for b in variation.buttons] == [
        ("Checking", "/SetSlots(account_type=checking)"),
        ("Savings", "/SetSlots(account_type=savings)"),
    ]
    assert domain.responses["utter_short"][0].text == "Plain text variation"
    assert domain.actions == {"action_check_funds", "action_transfer"}


def test_domain_files_merge_and_the_later_slot_definition_wins(tmp_path, caplog):
    first = write(tmp_path, "a.yml", DOMAIN)
    second = write(
        tmp_path,
        "b.yml",
        """
        slots:
          note: {type: any}
        responses:
          utter_bye: [{text: Bye}]
        """,
    )
    domain = read_domain([first, second], {first: "a.yml", second: "b.yml"})
    assert domain.slots["note"].type == "any"
    assert {"utter_ask_account_type", "utter_bye"} <= set(domain.responses)
    assert "defined again" in caplog.text


# ---------------------------------------------------------------------------------------------- annotated conversations


def test_annotated_conversations_accept_both_rephrasing_spellings(tmp_path, example_project):
    path = write(
        tmp_path,
        "annotations.yml",
        """
        conversations:
        - original_test_case: e2e_tests/hotels/hotel_du.yml::book a hotel
          steps:
          - user: I need a hotel in Lisbon
            llm_commands:
            - start flow book_hotel
            - SetSlot(hotel_city, Lisbon)
            passing_rephrasings: [Find me a hotel in Lisbon]
            failed_rephrasings: [Lisbon?]
          - utter: utter_ask_hotel_checkin_date
          - user: tomorrow
            llm_commands: [set hotel_checkin_date tomorrow]
            failing_rephrasings: [whenever]
        """,
    )
    (conversation,) = load_annotated_conversations(path, example_project)
    first, bot, last = conversation["steps"]
    assert conversation["original_test_case"] == "e2e_tests/hotels/hotel_du.yml::book a hotel"
    assert first["llm_commands"] == [StartFlow("book_hotel"), SetSlot("hotel_city", "Lisbon")]
    assert first["passing_rephrasings"] == ["Find me a hotel in Lisbon"]
    assert first["failing_rephrasings"] == ["Lisbon?"]
    assert "failed_rephrasings" not in first
    assert bot == {"utter": "utter_ask_hotel_checkin_date", "passing_rephrasings": [], "failing_rephrasings": []}
    assert last["llm_commands"] == [SetSlot("hotel_checkin_date", "tomorrow")]
    assert last["failing_rephrasings"] == ["whenever"]


def test_annotated_conversations_check_commands_against_the_assistant(tmp_path, example_project):
    path = write(
        tmp_path,
        "annotations.yml",
        """
        conversations:
        - original_test_case: x.yml::y
          steps:
          - user: hi
            llm_commands: [start flow book_spaceship]
        """,
    )
    with pytest.raises(InputError, match="unknown flow `book_spaceship`") as error:
        load_annotated_conversations(path, example_project)
    assert error.value.line == 5


def test_annotated_conversations_need_the_conversations_key(tmp_path, example_project):
    path = write(tmp_path, "annotations.yml", "test_cases: []\n")
    with pytest.raises(InputError, match="conversations") as error:
        load_annotated_conversations(path, example_project)
    assert error.value.line == 1
