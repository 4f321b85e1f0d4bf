"""The dialogue state tracker on small assistants written in each test: every flow-engine behaviour it models.

Each test writes its own flows next to one shared domain, plays a few user turns with explicit commands and checks
what a CALM flow engine would do (rasa-formats.md §2 flows, §3 domain, §4.1 fixtures and stubs): which responses
the bot says, which slots hold which values, and what is on the dialogue stack before the next user turn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from recipe.commands import (
    CancelFlow,
    ChitChat,
    Clarify,
    HumanHandoff,
    Knowledge,
    RepeatLastBotMessages,
    SetSlot,
    SkipQuestion,
    StartFlow,
)
from recipe.conditions import evaluate
from recipe.conversation import replay_test_case
from recipe.project import Project, load_project
from recipe.testcases import all_test_cases, load_tests
from recipe.tracker import DEFAULT_RESPONSES, GENERATED_ANSWER, DialogueTracker, FrameView, startable_flows

DOMAIN = """
version: "3.1"
slots:
  a: {type: text, mappings: [{type: from_llm}]}
  b: {type: text, mappings: [{type: from_llm}]}
  c: {type: text, mappings: [{type: from_llm}]}
  n: {type: float, mappings: [{type: from_llm}]}
  kind:
    type: categorical
    values: [small, large]
    mappings: [{type: from_llm}]
  flag: {type: bool, mappings: [{type: from_llm}]}
  confirm: {type: bool, mappings: [{type: from_llm}]}
  ok: {type: bool, mappings: [{type: controlled}]}
  logged_in: {type: bool, initial_value: false, mappings: [{type: controlled}]}
  driver: {type: text, mappings: [{type: from_llm}]}
  age: {type: float, mappings: [{type: from_llm}]}
responses:
  utter_ask_a: [{text: "A?"}]
  utter_ask_b: [{text: "B?"}]
  utter_ask_c: [{text: "C?"}]
  utter_ask_n: [{text: "N?"}]
  utter_ask_kind:
    - text: "Which kind?"
      buttons:
        - {title: Small, payload: "/SetSlots(kind=small)"}
        - {title: Large, payload: "/SetSlots(kind=large)"}
  utter_ask_flag: [{text: "Flag?"}]
  utter_ask_confirm: [{text: "Sure?"}]
  utter_ask_driver: [{text: "Driver?"}]
  utter_ask_age: [{text: "Age?"}]
  utter_too_young: [{text: "Too young."}]
  utter_done: [{text: "Done with {a}."}]
  utter_info: [{text: "Info."}]
  utter_big: [{text: "Big."}]
  utter_small: [{text: "Small."}]
  utter_other: [{text: "Other."}]
  utter_first: [{text: "First."}]
  utter_second: [{text: "Second."}]
  utter_welcome: [{text: "Welcome."}]
actions: [action_check, action_unknown]
"""


def make_project(root: Path, flows: str, domain_extra: str = "") -> Project:
    (root / "flows").mkdir(parents=True, exist_ok=True)
    (root / "flows" / "flows.yml").write_text(textwrap.dedent(flows), encoding="utf-8")
    domain = DOMAIN
    if domain_extra:
        # extra responses, indented as entries of `responses:` (which comes right before `actions:`)
        domain = domain.replace("actions: [", domain_extra.rstrip() + "\nactions: [")
    (root / "domain.yml").write_text(domain, encoding="utf-8")
    return load_project(root)


def said(events) -> list[str | None]:
    """What the bot said in a turn: response names where known, else the text."""
    return [m.utter or m.text for m in events.bot_messages]


def texts(events) -> list[str | None]:
    return [m.text for m in events.bot_messages]


def stack(tracker: DialogueTracker) -> list[tuple[str, str, str]]:
    return [(f.flow_id, f.kind, f.step_id) for f in tracker.state().stack]


TWO_SLOTS = """
flows:
  f:
    description: collect a then b
    steps:
      - collect: a
      - collect: b
      - action: utter_done
"""


# ---------------------------------------------------------------------------------------------- collect


def test_collect_asks_then_waits_and_state_is_before_the_next_turn(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    events = tracker.user_turn("start", [StartFlow("f")])
    assert events.flows_started == ["f"]
    assert said(events) == ["utter_ask_a"]
    assert stack(tracker) == [("f", "user", "f_0_collect_a")]
    state = tracker.state()
    assert state.stack == (FrameView("f", "user", "f_0_collect_a"),)
    assert "a" not in state.slots
    assert [(line.speaker, line.text) for line in state.transcript] == [("USER", "start"), ("AI", "A?")]

    events = tracker.user_turn("Lisbon", [SetSlot("a", "Lisbon")])
    assert events.slots_set == [("a", "Lisbon")]
    assert said(events) == ["utter_ask_b"]
    assert stack(tracker) == [("f", "user", "f_1_collect_b")]
    # the state is a copy: later turns do not change a state taken earlier
    assert "b" not in state.slots and state.stack[0].step_id == "f_0_collect_a"

    events = tracker.user_turn("Porto", [SetSlot("b", "Porto")])
    assert texts(events) == ["Done with Lisbon.", DEFAULT_RESPONSES["utter_can_do_something_else"]]
    assert events.flows_completed[0][0] == "f"
    assert stack(tracker) == []
    # the flow's slots are reset when it ends
    assert "a" not in tracker.slots and "b" not in tracker.slots


def test_collect_is_skipped_when_the_slot_is_already_filled(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    events = tracker.user_turn("a is x", [StartFlow("f"), SetSlot("a", "x")])
    assert said(events) == ["utter_ask_b"]
    assert stack(tracker) == [("f", "user", "f_1_collect_b")]
    assert tracker.slots["a"] == "x"


def test_ask_before_filling_asks_even_when_filled_and_again_when_reached_again(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: confirm in a loop
            steps:
              - id: ask_confirm
                collect: confirm
                ask_before_filling: true
              - action: utter_info
                next:
                  - if: not slots.confirm
                    then: ask_confirm
                  - else: END
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("yes, do it", [StartFlow("f"), SetSlot("confirm", "true")])
    assert said(events) == ["utter_ask_confirm"]
    assert tracker.slots.get("confirm") is None  # cleared: the question is asked before the slot is filled
    events = tracker.user_turn("no", [SetSlot("confirm", "false")])
    # info, then the loop reaches the ask_before_filling step again: it asks again although the slot is filled
    assert said(events) == ["utter_info", "utter_ask_confirm"]
    assert stack(tracker) == [("f", "user", "ask_confirm")]
    events = tracker.user_turn("yes", [SetSlot("confirm", "true")])
    assert said(events)[0] == "utter_info" and stack(tracker) == []


def test_rejection_says_its_response_clears_the_slot_and_asks_again(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: age check
            steps:
              - collect: age
                rejections:
                  - if: slots.age < 21
                    utter: utter_too_young
              - action: utter_info
    """,
    )
    tracker = DialogueTracker(project)
    tracker.user_turn("go", [StartFlow("f")])
    events = tracker.user_turn("19", [SetSlot("age", "19")])
    assert said(events) == ["utter_too_young", "utter_ask_age"]
    assert tracker.slots.get("age") is None
    events = tracker.user_turn("25", [SetSlot("age", "25")])
    assert said(events)[0] == "utter_info"
    # a value given before the step is reached is checked too
    tracker = DialogueTracker(project)
    events = tracker.user_turn("I'm 18", [StartFlow("f"), SetSlot("age", "18")])
    assert said(events) == ["utter_too_young", "utter_ask_age"]


def test_collect_with_its_own_utter(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: custom question
            steps:
              - collect: a
                utter: utter_info
    """,
    )
    events = DialogueTracker(project).user_turn("go", [StartFlow("f")])
    assert said(events) == ["utter_info"]


# ---------------------------------------------------------------------------------------------- actions and stubs

CHECKED = """
flows:
  f:
    description: check then branch
    steps:
      - collect: a
      - action: action_check
        next:
          - if: slots.ok
            then:
              - action: utter_big
                next: END
          - else:
              - action: utter_small
                next: END
"""


def test_action_with_a_stub_applies_its_events_and_says_its_responses(tmp_path):
    from recipe.types import Stub

    stubs = {"action_check": Stub(events=(("ok", True),), responses=("Checked it.",))}
    tracker = DialogueTracker(make_project(tmp_path, CHECKED), stubs)
    events = tracker.user_turn("a", [StartFlow("f"), SetSlot("a", "x")])
    assert events.actions[:1] == ["action_check"]
    assert ("ok", True) in events.slots_set
    assert texts(events)[:2] == ["Checked it.", "Big."]
    assert events.warnings == []


def test_action_without_a_stub_warns_and_leaves_the_slots_unchanged(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, CHECKED), fixture_slots=[("ok", True)])
    before = dict(tracker.slots)
    events = tracker.user_turn("a", [StartFlow("f"), SetSlot("a", "x")])
    assert len(events.warnings) == 1
    assert "action_check" in events.warnings[0] and "stub" in events.warnings[0]
    assert tracker.slots["ok"] is before["ok"] is True  # unchanged, so the `ok` branch is taken
    assert said(events)[0] == "utter_big"


def test_stubs_per_file_and_per_test_case_override(tmp_path):
    project = make_project(tmp_path, CHECKED)
    tests = tmp_path / "e2e_tests"
    tests.mkdir()
    (tests / "checks.yml").write_text(
        textwrap.dedent("""
        stub_custom_actions:
          action_check:
            events: [{event: slot, name: ok, value: true}]
            responses: []
          not ok here::action_check:
            events: [{event: slot, name: ok, value: false}]
            responses: [{text: "Nope."}]
        test_cases:
          - test_case: ok here
            steps:
              - user: go
                commands: [start flow f, set slot a x]
          - test_case: not ok here
            steps:
              - user: go
                commands: [start flow f, set slot a x]
    """),
        encoding="utf-8",
    )
    cases = {case.name: case for case in all_test_cases(load_tests([str(tests / "checks.yml")], project))}
    (ok_turn,) = replay_test_case(project, cases["ok here"])
    (not_ok_turn,) = replay_test_case(project, cases["not ok here"])
    assert said(ok_turn.events) == ["utter_big", "utter_can_do_something_else"]
    assert ok_turn.events.slots_set[-1] == ("ok", True)
    assert texts(not_ok_turn.events)[:2] == ["Nope.", "Small."]
    assert ("ok", False) in not_ok_turn.events.slots_set
    assert ok_turn.warnings == [] and not_ok_turn.warnings == []


def test_listed_responses_keep_the_slot_values_of_the_moment_they_were_said(tmp_path):
    # utter_done says "Done with {a}." as the flow's last step; by the end of the turn the flow has ended and `a`
    # is reset, yet the transcript shows the text as it was said.
    project = make_project(tmp_path, TWO_SLOTS)
    tests = tmp_path / "e2e_tests"
    tests.mkdir()
    (tests / "du.yml").write_text(
        textwrap.dedent("""
        test_cases:
          - test_case: done
            steps:
              - user: a is Lisbon, b is Porto
                commands: [start flow f, set slot a Lisbon, set slot b Porto]
              - utter: utter_done
              - utter: utter_can_do_something_else
              - user: thanks
                commands: [offtopic reply]
    """),
        encoding="utf-8",
    )
    (case,) = all_test_cases(load_tests([str(tests)], project))
    first, second = replay_test_case(project, case)
    assert "a" not in first.slots_after
    assert [line.text for line in second.state.transcript[1:]] == [
        "Done with Lisbon.",
        DEFAULT_RESPONSES["utter_can_do_something_else"],
    ]


def test_e2e_tests_may_list_only_some_bot_messages(tmp_path):
    # Classic E2E steps need not list every bot message (extra ones are allowed): the transcript keeps what the
    # assistant said. A listing the simulation contradicts is taken as written.
    project = make_project(tmp_path, TWO_SLOTS)
    tests = tmp_path / "e2e_tests"
    tests.mkdir()
    (tests / "e2e.yml").write_text(
        textwrap.dedent("""
        test_cases:
          - test_case: partial
            steps:
              - user: a is Lisbon, b is Porto
              - bot: Done with Lisbon.
              - user: thanks
              - utter: utter_info
              - user: bye
    """),
        encoding="utf-8",
    )
    (case,) = all_test_cases(load_tests([str(tests)], project))
    commands = {1: [StartFlow("f"), SetSlot("a", "Lisbon"), SetSlot("b", "Porto")], 2: [ChitChat()], 3: [ChitChat()]}
    turns = replay_test_case(project, case, lambda number, step: commands[number])
    assert [line.text for line in turns[1].state.transcript[1:]] == [
        "Done with Lisbon.",
        DEFAULT_RESPONSES["utter_can_do_something_else"],
    ]
    assert turns[2].state.transcript[-1].text == "Info."  # not what the simulation said (a generated reply)


def test_set_slots_step_sets_and_unsets(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: set slots
            steps:
              - set_slots:
                  - kind: large
                  - n: 3
                  - a: null
              - collect: b
    """,
    )
    tracker = DialogueTracker(project, fixture_slots=[("a", "was set")])
    events = tracker.user_turn("go", [StartFlow("f")])
    assert ("kind", "large") in events.slots_set and ("n", 3) in events.slots_set and ("a", None) in events.slots_set
    assert tracker.slots["kind"] == "large" and tracker.slots["n"] == 3 and tracker.slots.get("a") is None
    assert said(events) == ["utter_ask_b"]


# ---------------------------------------------------------------------------------------------- next, link, call, END

BRANCHES = """
flows:
  f:
    description: branches
    steps:
      - collect: n
      - noop: true
        next:
          - if: slots.n > 8 and slots.kind = "large"
            then:
              - action: utter_big
                next: END
          - if: not slots.flag or slots.n <= 2
            then:
              - action: utter_small
              - action: utter_first
          - else:
              - action: utter_other
              - action: utter_second
                next: END
"""


@pytest.mark.parametrize(
    ("slots", "expected"),
    [
        ({"kind": "large", "flag": "true"}, ["utter_big"]),  # n = 10 > 8 and large
        ({"kind": "small", "flag": "false"}, ["utter_small", "utter_first"]),  # not flag
        ({"kind": "small", "flag": "true"}, ["utter_other", "utter_second"]),  # neither
    ],
)
def test_next_conditions_with_and_or_not_and_comparisons_and_nested_lists(tmp_path, slots, expected):
    tracker = DialogueTracker(make_project(tmp_path, BRANCHES), fixture_slots=list(slots.items()))
    events = tracker.user_turn("ten", [StartFlow("f"), SetSlot("n", "10")])
    assert said(events)[: len(expected)] == expected
    # every branch list ends the flow (explicit END, or the last step of a nested list)
    assert stack(tracker) == [] and events.flows_completed[0][0] == "f"


def test_or_branch_taken_by_its_second_operand(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, BRANCHES), fixture_slots=[("flag", True)])
    events = tracker.user_turn("two", [StartFlow("f"), SetSlot("n", "2")])
    assert said(events)[:2] == ["utter_small", "utter_first"]


@pytest.mark.parametrize(
    ("condition", "slots", "holds"),
    [
        ("slots.a", {"a": "x"}, True),
        ("slots.a", {}, False),
        ("not slots.flag", {"flag": False}, True),
        ("not slots.flag", {}, True),
        ("slots.n >= 40", {"n": 40.0}, True),
        ("slots.n < 40", {"n": 40.0}, False),
        ("slots.n != 3", {"n": 3.0}, False),
        ("slots.kind == 'small'", {"kind": "small"}, True),
        ('slots.kind is "large"', {"kind": "small"}, False),
        ('slots.kind is not "large"', {"kind": "small"}, True),
        ("slots.a and (slots.n > 1 or slots.flag)", {"a": "x", "flag": True}, True),
        ("slots.a and (slots.n > 1 or slots.flag)", {"a": "x", "flag": False}, False),
        ("slots.flag = true", {"flag": True}, True),
        ("slots.a is null", {}, True),
        ("False", {}, False),
    ],
)
def test_condition_language(condition, slots, holds):
    assert evaluate(condition, slots) is holds


def test_link_ends_the_flow_and_starts_the_linked_one(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: links on
            steps:
              - collect: a
              - link: g
          g:
            description: only reachable by link
            if: False
            steps:
              - collect: b
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("go", [StartFlow("f"), SetSlot("a", "x")])
    assert [flow for flow, _ in events.flows_completed] == ["f"]
    assert events.flows_started == ["f", "g"]
    assert said(events) == ["utter_ask_b"]
    assert stack(tracker) == [("g", "user", "g_0_collect_b")]
    assert "a" not in tracker.slots  # f ended: its slots are reset


def test_call_runs_the_child_inline_and_returns_to_the_caller(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          rent:
            description: rent with a called driver check
            steps:
              - collect: a
              - call: driver_details
              - collect: b
          driver_details:
            description: driver
            if: False
            persisted_slots: [driver]
            steps:
              - collect: driver
              - collect: age
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("rent", [StartFlow("rent"), SetSlot("a", "x")])
    assert said(events) == ["utter_ask_driver"]
    assert stack(tracker) == [
        ("rent", "user", "rent_1_call_driver_details"),
        ("driver_details", "called", "driver_details_0_collect_driver"),
    ]
    events = tracker.user_turn("Ana", [SetSlot("driver", "Ana")])
    assert said(events) == ["utter_ask_age"]
    events = tracker.user_turn("30", [SetSlot("age", "30")])
    # the child ends (no pattern for it) and the caller goes on with its next step
    assert said(events) == ["utter_ask_b"]
    assert [flow for flow, _ in events.flows_completed] == ["driver_details"]
    assert stack(tracker) == [("rent", "user", "rent_2_collect_b")]
    assert tracker.slots["driver"] == "Ana"  # persisted
    assert "age" not in tracker.slots  # not persisted: reset when the child ended


def test_next_end_stops_the_flow_early_and_run_pattern_completed_false_skips_completion(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: ends early
            steps:
              - action: utter_first
                next: END
              - action: utter_second
          quiet:
            description: ends without the completion pattern
            run_pattern_completed: false
            steps:
              - action: utter_first
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("go", [StartFlow("f")])
    assert said(events) == ["utter_first", "utter_can_do_something_else"]
    assert "pattern_completed" in events.flows_started
    events = tracker.user_turn("again", [StartFlow("quiet")])
    assert said(events) == ["utter_first"]
    assert "pattern_completed" not in events.flows_started


# ---------------------------------------------------------------------------------------------- guards

GUARDED = """
flows:
  open:
    description: anyone
    steps:
      - action: utter_info
  members:
    description: logged in only
    if: slots.logged_in
    steps:
      - action: utter_welcome
  hidden:
    description: only by link or call
    if: False
    steps:
      - action: utter_first
"""


def test_guarded_flow_is_not_startable_until_its_slot_is_set(tmp_path):
    project = make_project(tmp_path, GUARDED)
    tracker = DialogueTracker(project)
    assert [flow.id for flow in startable_flows(project, tracker.slots)] == ["open"]
    events = tracker.user_turn("members area", [StartFlow("members")])
    assert events.flows_started == [] and said(events) == []
    assert any("members" in warning for warning in events.warnings)
    events = tracker.user_turn("/SetSlots(logged_in=true)", [])
    assert tracker.slots["logged_in"] is True
    assert [flow.id for flow in startable_flows(project, tracker.slots)] == ["open", "members"]
    events = tracker.user_turn("members area", [StartFlow("members")])
    assert said(events)[0] == "utter_welcome"


def test_if_false_flow_is_never_started_by_a_command(tmp_path):
    project = make_project(tmp_path, GUARDED)
    tracker = DialogueTracker(project, fixture_slots=[("logged_in", True)])
    assert "hidden" not in [flow.id for flow in startable_flows(project, tracker.slots)]
    events = tracker.user_turn("hidden", [StartFlow("hidden")])
    assert events.flows_started == [] and events.warnings


# ---------------------------------------------------------------------------------------------- patterns


def test_cancel_resets_the_flows_slots_and_resumes_the_interrupted_flow(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          outer:
            description: outer
            steps:
              - collect: a
              - collect: b
          inner:
            description: inner
            steps:
              - collect: c
              - collect: n
    """,
    )
    tracker = DialogueTracker(project)
    tracker.user_turn("outer", [StartFlow("outer"), SetSlot("a", "x")])
    events = tracker.user_turn("inner first", [StartFlow("inner"), SetSlot("c", "y")])
    assert said(events) == ["utter_ask_n"]
    assert [f[0] for f in stack(tracker)] == ["outer", "inner"]
    events = tracker.user_turn("forget that", [CancelFlow()])
    assert events.flows_cancelled == [("inner", "inner_1_collect_n")]
    assert "pattern_cancel_flow" in events.flows_started
    assert texts(events)[0] == DEFAULT_RESPONSES["utter_flow_cancelled_rasa"]
    assert said(events)[1:] == ["utter_ask_b"]  # the interrupted flow asks its question again
    assert "c" not in tracker.slots and tracker.slots["a"] == "x"
    assert stack(tracker) == [("outer", "user", "outer_1_collect_b")]


def test_correction_rewinds_to_the_corrected_collect_and_reruns_later_actions(tmp_path):
    from recipe.types import Stub

    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: correctable
            steps:
              - collect: a
              - collect: b
              - action: action_check
              - collect: c
    """,
    )
    tracker = DialogueTracker(project, {"action_check": Stub(events=(("ok", True),), responses=())})
    tracker.user_turn("go", [StartFlow("f"), SetSlot("a", "x")])
    events = tracker.user_turn("b", [SetSlot("b", "y")])
    assert events.actions == ["action_check"] and said(events) == ["utter_ask_c"]
    events = tracker.user_turn("oh, a is z", [SetSlot("a", "z")])
    assert "pattern_correction" in events.flows_started
    assert texts(events)[0] == DEFAULT_RESPONSES["utter_corrected_previous_input"]
    assert "action_check" in events.actions  # the steps after the corrected one run again
    assert said(events)[-1] == "utter_ask_c"
    assert tracker.slots["a"] == "z" and tracker.slots["b"] == "y"
    assert stack(tracker) == [("f", "user", "f_3_collect_c")]


def test_not_a_correction_same_value_or_the_slot_being_asked(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    tracker.user_turn("go", [StartFlow("f"), SetSlot("a", "x")])
    events = tracker.user_turn("a is X, b is y", [SetSlot("a", "X"), SetSlot("b", "y")])
    assert "pattern_correction" not in events.flows_started  # same value (case aside) and the asked slot
    assert said(events)[0] == "utter_done"


def test_clarification_offers_the_valid_options_and_ends(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          book_a:
            name: book an A
            description: a
            steps: [{collect: a}]
          book_b:
            description: b
            steps: [{collect: b}]
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("book something", [Clarify(("book_b", "book_a", "pattern_search"))])
    assert events.clarification_options == ["book_a", "book_b"]
    assert "pattern_clarification" in events.flows_started
    # the response names the options by their flow names (the id where a flow has no name)
    expected = DEFAULT_RESPONSES["utter_clarification_options_rasa"].replace(
        "{clarification_options}", "book an A or book_b"
    )
    assert texts(events) == [expected]
    assert stack(tracker) == []  # the pattern is done: the user answers with no flow active
    events = tracker.user_turn("the A", [StartFlow("book_a")])
    assert said(events) == ["utter_ask_a"]
    # one valid option is a start of that flow
    tracker = DialogueTracker(project)
    events = tracker.user_turn("b please", [Clarify(("book_b", "unknown_flow"))])
    assert events.flows_started == ["book_b"] and said(events) == ["utter_ask_b"]


@pytest.mark.parametrize(
    ("command", "pattern", "first"),
    [
        (ChitChat(), "pattern_chitchat", GENERATED_ANSWER),
        (Knowledge(), "pattern_search", GENERATED_ANSWER),
        (SkipQuestion(), "pattern_skip_question", DEFAULT_RESPONSES["utter_skip_question_answer"]),
        (HumanHandoff(), "pattern_human_handoff", DEFAULT_RESPONSES["utter_human_handoff_not_available"]),
    ],
)
def test_interrupting_patterns_then_the_pending_question_again(tmp_path, command, pattern, first):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    tracker.user_turn("go", [StartFlow("f")])
    events = tracker.user_turn("something else", [command])
    assert events.flows_started == [pattern]
    assert len(events.bot_messages) == 2
    assert events.bot_messages[0].text == first  # a generated answer (chitchat, search) shows as a placeholder
    assert said(events)[1] == "utter_ask_a"
    assert stack(tracker) == [("f", "user", "f_0_collect_a")]


def test_patterns_outside_a_flow_say_their_piece_only(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    events = tracker.user_turn("get me a human", [HumanHandoff()])
    assert texts(events) == [DEFAULT_RESPONSES["utter_human_handoff_not_available"]]
    assert stack(tracker) == []


def test_repeat_in_a_collect_repeats_earlier_messages_and_asks_the_question_once(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: info then a question
            steps:
              - action: utter_info
              - collect: a
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("go", [StartFlow("f")])
    assert said(events) == ["utter_info", "utter_ask_a"]
    events = tracker.user_turn("say again?", [RepeatLastBotMessages()])
    assert events.flows_started == ["pattern_repeat_bot_messages"]
    assert said(events) == ["utter_info", "utter_ask_a"]
    assert texts(events) == ["Info.", "A?"]


def test_repeat_outside_a_flow_repeats_every_last_message(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    tracker.user_turn("go", [StartFlow("f"), SetSlot("a", "x"), SetSlot("b", "y")])
    events = tracker.user_turn("what?", [RepeatLastBotMessages()])
    assert said(events) == ["utter_done", "utter_can_do_something_else"]
    assert texts(events)[0] == "Done with x."


def test_digression_then_continue_interrupted(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          outer:
            description: outer
            steps:
              - collect: a
              - collect: b
          quick:
            description: a quick one
            steps:
              - collect: c
              - action: utter_info
    """,
    )
    tracker = DialogueTracker(project)
    tracker.user_turn("outer", [StartFlow("outer"), SetSlot("a", "x")])
    events = tracker.user_turn("first this", [StartFlow("quick")])
    assert said(events) == ["utter_ask_c"]
    assert [f[0] for f in stack(tracker)] == ["outer", "quick"]
    events = tracker.user_turn("c", [SetSlot("c", "z")])
    assert said(events) == ["utter_info", "utter_flow_continue_interrupted", "utter_ask_b"]
    assert "pattern_continue_interrupted" in events.flows_started
    assert "pattern_completed" not in events.flows_started
    assert stack(tracker) == [("outer", "user", "outer_1_collect_b")]


def test_cannot_handle_when_nothing_is_understood_outside_flows(tmp_path):
    tracker = DialogueTracker(make_project(tmp_path, TWO_SLOTS))
    events = tracker.user_turn("blub", [])
    assert events.flows_started == ["pattern_cannot_handle"]
    assert texts(events) == [DEFAULT_RESPONSES["utter_ask_rephrase"]]


# ---------------------------------------------------------------------------------------------- fixtures, payloads


def test_fixtures_set_typed_slots_before_the_first_turn(tmp_path):
    project = make_project(tmp_path, GUARDED)
    tests = tmp_path / "e2e_tests"
    (tests / "sub").mkdir(parents=True)
    (tests / "conftest.yml").write_text("fixtures:\n  - member: [{logged_in: true}, {n: 3}]\n", encoding="utf-8")
    (tests / "sub" / "t.yml").write_text(
        textwrap.dedent("""
        test_cases:
          - test_case: member
            fixtures: [member]
            steps:
              - user: hi
                commands: [start flow members]
    """),
        encoding="utf-8",
    )
    (case,) = all_test_cases(load_tests([str(tests)], project))
    (turn,) = replay_test_case(project, case)
    assert turn.state.slots["logged_in"] is True and turn.state.slots["n"] == 3  # before the first turn
    assert said(turn.events)[0] == "utter_welcome"
    # without the fixture the initial value holds and the guard fails
    assert DialogueTracker(project).slots["logged_in"] is False


def test_button_payload_sets_slots_without_commands(tmp_path):
    project = make_project(
        tmp_path,
        """
        flows:
          f:
            description: kind then flag
            steps:
              - collect: kind
              - collect: flag
              - collect: a
    """,
    )
    tracker = DialogueTracker(project)
    events = tracker.user_turn("go", [StartFlow("f")])
    assert events.bot_messages[0].buttons[1].payload == "/SetSlots(kind=large)"
    events = tracker.user_turn("/SetSlots(kind=Large, flag=true)", [])
    assert events.slots_set == [("kind", "large"), ("flag", True)]  # typed: categorical spelling, bool
    assert said(events) == ["utter_ask_a"]
    assert tracker.state().transcript[-2].text == "/SetSlots(kind=Large, flag=true)"


def test_project_patterns_and_domain_responses_override_our_defaults(tmp_path):
    flows = (
        TWO_SLOTS
        + """
  pattern_cancel_flow:
    description: our own cancel
    steps:
      - action: action_cancel_flow
      - action: utter_first
"""
    )
    overridden = make_project(tmp_path / "own", flows)
    tracker = DialogueTracker(overridden)
    tracker.user_turn("go", [StartFlow("f")])
    assert texts(tracker.user_turn("stop", [CancelFlow()])) == ["First."]

    # no pattern in the project: our default pattern, whose response text the domain may override
    reworded = make_project(
        tmp_path / "reworded", TWO_SLOTS, domain_extra='  utter_flow_cancelled_rasa: [{text: "Stopped it."}]'
    )
    tracker = DialogueTracker(reworded)
    tracker.user_turn("go", [StartFlow("f")])
    assert texts(tracker.user_turn("stop", [CancelFlow()])) == ["Stopped it."]

    default = make_project(tmp_path / "default", TWO_SLOTS)
    tracker = DialogueTracker(default)
    tracker.user_turn("go", [StartFlow("f")])
    assert texts(tracker.user_turn("stop", [CancelFlow()])) == [DEFAULT_RESPONSES["utter_flow_cancelled_rasa"]]
