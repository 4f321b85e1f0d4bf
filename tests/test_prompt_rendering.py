"""Prompt rendering: runtime equivalence for any template, golden prompts of the bundled example, date and time.

(a) Templates written the ways runtime templates are written (plain-text flow lists, one-line hand-built JSON,
    conditionals on the current flow and slot, loops over the flow's slots, the date block) are rendered from
    hand-built dialogue states; every expected text below is written out by hand from the rules in
    rasa-formats.md §6 (variables, §6.1 Jinja2 environment, §6.2 transcript, §6.3 date block), whitespace included.
(b) Golden prompts of the bundled example for both of our templates, rendered through `recipe render-prompt`.
    Regenerate with `RECIPE_UPDATE_GOLDEN=1 pytest tests/test_prompt_rendering.py` and read every changed file.
(c) `--state`, and a date and time that is deterministic, varied across conversations, and never the wall clock.
"""

from __future__ import annotations

import json
import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from recipe.cli import main
from recipe.project import load_project
from recipe.prompt import DatetimePolicy, PromptRenderer, PromptTemplate, prompt_variables
from recipe.tracker import DialogueState, FrameView, TranscriptLine
from recipe.types import Button

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("RECIPE_UPDATE_GOLDEN") == "1"

# ---------------------------------------------------------------------------------------------- (a) equivalence

FLOWS = """
flows:
  transfer_money:
    description: Send money to someone.
    steps:
      - collect: recipient
        description: name of the payee
      - call: verify_identity
      - collect: account
        description: account to pay from
      - collect: amount
        description: amount in euros
        next:
          - if: slots.amount > 1000
            then:
              - collect: reason
                description: why so much
                next: confirm
          - else: confirm
      - id: confirm
        collect: confirm_transfer
        description: yes to send
        ask_before_filling: true
      - collect: recipient
        description: name of the payee
      - collect: amount
        description: amount again
  verify_identity:
    description: Check who the user is.
    if: False
    steps:
      - collect: pin
  check_balance:
    description: Check the balance — "fast" & <safe>
    steps:
      - collect: account
  members_only:
    description: Members area.
    if: slots.logged_in
    steps:
      - action: utter_welcome
  hidden:
    description: Hidden.
    if: False
    steps:
      - action: utter_welcome
  pattern_chitchat:
    description: small talk
    steps:
      - action: utter_welcome
"""

DOMAIN = """
version: "3.1"
slots:
  recipient: {type: text, mappings: [{type: from_llm}]}
  pin: {type: text, mappings: [{type: from_llm}]}
  account:
    type: categorical
    values: [checking, savings, __other__]
    mappings: [{type: from_llm}]
  amount: {type: float, mappings: [{type: from_llm}]}
  reason: {type: text, mappings: [{type: from_llm}]}
  confirm_transfer: {type: bool, mappings: [{type: from_llm}]}
  logged_in: {type: bool, initial_value: false, mappings: [{type: controlled}]}
responses:
  utter_welcome: [{text: "Welcome."}]
"""

PLAIN_LIST = (
    "{% for flow in available_flows %}{{ flow.name }}: {{ flow.description }}\n"
    "{% for slot in flow.slots %}    {{ slot.name }}{% if slot.description %}: {{ slot.description }}{% endif %}"
    "{% if slot.allowed_values %} (allowed: {{ slot.allowed_values }}){% endif %}\n"
    "{% endfor %}{% endfor %}"
)

JSON_FLOWS = (
    '{"flows":[{% for flow in available_flows %}{"name":{{ flow.name | to_json_escaped_string }},'
    '"description":{{ flow.description | to_json_escaped_string }},"slots":[{% for slot in flow.slots %}'
    '{"name":{{ slot.name | to_json_escaped_string }},"description":{{ slot.description | to_json_escaped_string }}'
    '{% if slot.allowed_values %},"allowed_values":{{ slot.allowed_values }}{% endif %}}'
    "{% if not loop.last %},{% endif %}{% endfor %}]}{% if not loop.last %},{% endif %}{% endfor %}]}\n"
)

CURRENT_STATE = (
    "{% if current_flow %}flow: {{ current_flow }}\n"
    "{% if current_slot %}asking: {{ current_slot }} ({{ current_slot_description }})\n{% endif %}"
    "{% for slot in flow_slots %}- {{ slot.name }} = {{ slot.value }} [{{ slot.type }}] {{ slot.description }} "
    "{{ slot.allowed_values }}\n{% endfor %}"
    "{% else %}no flow\n{% endif %}\n"
)

CONVERSATION = (
    "{{ current_conversation }}\n"
    "---\n"
    '"""{{ user_message }}"""\n'
    "{% if current_datetime %}Current date: {{ current_datetime.strftime('%d %B, %Y') }}\n"
    "Current time: {{ current_datetime.strftime('%H:%M:%S') }} ({{ current_datetime.tzinfo }})\n"
    "Current day: {{ current_datetime.strftime('%A') }}{% endif %}\n"
)

MARCH_5 = datetime(2026, 3, 5, 14, 5, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    (root / "data").mkdir()
    (root / "data" / "flows.yml").write_text(FLOWS, encoding="utf-8")
    (root / "domain.yml").write_text(DOMAIN, encoding="utf-8")
    return load_project(root)


def render(project, template: str, state: DialogueState, message: str = "hi", when=None) -> str:
    renderer = PromptRenderer(PromptTemplate(text=template, path="<test>"))
    return renderer.render(prompt_variables(project, state, message, when))


def state(slots=None, stack=(), transcript=()) -> DialogueState:
    return DialogueState(slots=dict(slots or {}), stack=tuple(stack), transcript=tuple(transcript))


def test_plain_flow_list_file_order_guards_collect_steps_not_deduplicated(bank):
    # Guards applied (members_only needs logged_in; `if: False` flows never listed; patterns never listed);
    # one line per collect step in text order (the nested `reason` after `amount`), the called flow's `pin` where
    # it is called, repeated collect steps repeated, the ask_before_filling slot hidden while empty, `__other__`
    # left out of the allowed values, a step without description printed without one.
    expected = (
        "transfer_money: Send money to someone.\n"
        "    recipient: name of the payee\n"
        "    pin\n"
        "    account: account to pay from (allowed: ['checking', 'savings'])\n"
        "    amount: amount in euros\n"
        "    reason: why so much\n"
        "    recipient: name of the payee\n"
        "    amount: amount again\n"
        'check_balance: Check the balance — "fast" & <safe>\n'
        "    account (allowed: ['checking', 'savings'])\n"
    )
    assert render(bank, PLAIN_LIST, state({"logged_in": False})) == expected


def test_plain_flow_list_shows_filled_ask_before_filling_slot_and_guarded_flow(bank):
    expected = (
        "transfer_money: Send money to someone.\n"
        "    recipient: name of the payee\n"
        "    pin\n"
        "    account: account to pay from (allowed: ['checking', 'savings'])\n"
        "    amount: amount in euros\n"
        "    reason: why so much\n"
        "    confirm_transfer: yes to send (allowed: [True, False])\n"
        "    recipient: name of the payee\n"
        "    amount: amount again\n"
        'check_balance: Check the balance — "fast" & <safe>\n'
        "    account (allowed: ['checking', 'savings'])\n"
        "members_only: Members area.\n"
    )
    assert render(bank, PLAIN_LIST, state({"logged_in": True, "confirm_transfer": False})) == expected


def test_one_line_json_flows_with_unquoted_allowed_values(bank):
    # to_json_escaped_string: strings quoted and escaped, non-ASCII kept, None as null; the allowed values are
    # pasted as the Python list repr they are (not JSON); the template's final newline is dropped.
    expected = (
        '{"flows":[{"name":"transfer_money","description":"Send money to someone.","slots":['
        '{"name":"recipient","description":"name of the payee"},'
        '{"name":"pin","description":null},'
        '{"name":"account","description":"account to pay from","allowed_values":[\'checking\', \'savings\']},'
        '{"name":"amount","description":"amount in euros"},'
        '{"name":"reason","description":"why so much"},'
        '{"name":"recipient","description":"name of the payee"},'
        '{"name":"amount","description":"amount again"}]},'
        '{"name":"check_balance","description":"Check the balance — \\"fast\\" & <safe>","slots":['
        '{"name":"account","description":null,"allowed_values":[\'checking\', \'savings\']}]}]}'
    )
    assert render(bank, JSON_FLOWS, state()) == expected


def test_current_flow_skips_called_frames_and_current_slot_comes_from_the_called_step(bank):
    during_call = state(
        {"recipient": "Mia", "logged_in": False},
        [
            FrameView("transfer_money", "user", "transfer_money_1_call_verify_identity"),
            FrameView("verify_identity", "called", "verify_identity_0_collect_pin"),
        ],
    )
    # flow_slots: the current flow's collect steps (called flow's included), deduplicated by (slot, description):
    # the second `recipient` step (same description) is dropped, the second `amount` (another description) kept;
    # the empty ask_before_filling slot is not asked now, so it is left out.
    expected = (
        "flow: transfer_money\n"
        "asking: pin (None)\n"
        "- recipient = Mia [text] name of the payee None\n"
        "- pin = undefined [text] None None\n"
        "- account = undefined [categorical] account to pay from ['checking', 'savings']\n"
        "- amount = undefined [float] amount in euros None\n"
        "- reason = undefined [text] why so much None\n"
        "- amount = undefined [float] amount again None\n"
    )
    assert render(bank, CURRENT_STATE, during_call) == expected


def test_flow_slots_values_as_strings_and_the_asked_ask_before_filling_slot(bank):
    at_confirm = state(
        {"recipient": "Mia", "pin": "1234", "account": "savings", "amount": 40.0, "logged_in": False},
        [FrameView("transfer_money", "user", "confirm")],
    )
    expected = (
        "flow: transfer_money\n"
        "asking: confirm_transfer (yes to send)\n"
        "- recipient = Mia [text] name of the payee None\n"
        "- pin = 1234 [text] None None\n"
        "- account = savings [categorical] account to pay from ['checking', 'savings']\n"
        "- amount = 40.0 [float] amount in euros None\n"
        "- reason = undefined [text] why so much None\n"
        "- confirm_transfer = undefined [bool] yes to send [True, False]\n"
        "- amount = 40.0 [float] amount again None\n"
    )
    assert render(bank, CURRENT_STATE, at_confirm) == expected
    (amount_again,) = [s for s in bank.flows["transfer_money"].steps.values() if s.description == "amount again"]
    confirmed = state(
        {**at_confirm.slots, "confirm_transfer": True}, [FrameView("transfer_money", "user", amount_again.id)]
    )
    lines = render(bank, CURRENT_STATE, confirmed).splitlines()
    assert lines[1] == "asking: amount (amount again)"
    assert "- confirm_transfer = True [bool] yes to send [True, False]" in lines


def test_no_flow_and_pattern_on_top(bank):
    assert render(bank, CURRENT_STATE, state()) == "no flow\n"
    clarifying = state(
        {},
        [
            FrameView("transfer_money", "user", "confirm"),
            FrameView("pattern_clarification", "pattern", "pattern_clarification_0_action"),
        ],
    )
    assert render(bank, CURRENT_STATE, clarifying) == "flow: pattern_clarification\n"


def _line(speaker, text, *buttons):
    return TranscriptLine(speaker, text, tuple(Button(title, f"/{title}") for title in buttons))


def test_transcript_last_20_lines_buttons_skipped_messages_newlines_and_date_block(bank):
    lines = [_line("USER", "dropped 1"), _line("AI", "dropped 2")]
    lines += [_line("USER" if i % 2 else "AI", f"line {i}") for i in range(3, 19)]  # 16 lines: 3 .. 18
    lines += [
        _line("AI", None),  # neither text nor buttons: not shown, not counted
        _line("AI", "Pick one", "Small", "Large"),
        _line("AI", "", "Only buttons"),
        _line("USER", "a\nb\n"),
        _line("AI", "<b>&amp; stays"),
    ]
    expected_history = "\n".join(
        [f"{'USER' if i % 2 else 'AI'}: line {i}" for i in range(3, 19)]
        + [
            'AI: Pick one button 1: "Small", button 2: "Large"',
            'AI: button 1: "Only buttons"',
            "USER: a b ",
            "AI: <b>&amp; stays",
        ]
    )
    # only "\n" becomes a space, as at runtime ("\r" stays); the date block lines as the reference spells them
    expected = (
        f"{expected_history}\n"
        "USER: two\r lines and <i>\n"
        "---\n"
        '"""two\r lines and <i>"""\n'
        "Current date: 05 March, 2026\n"
        "Current time: 14:05:09 (UTC)\n"
        "Current day: Thursday"
    )
    assert render(bank, CONVERSATION, state(transcript=lines), "two\r\nlines and <i>", MARCH_5) == expected


def test_first_turn_transcript_starts_with_a_newline_and_no_datetime(bank):
    assert render(bank, CONVERSATION, state(), "hello") == '\nUSER: hello\n---\n"""hello"""\n'


def test_json_filter_keeps_non_ascii_and_turns_none_into_null(bank):
    template = "{{ a | to_json_escaped_string }} {{ b | to_json_escaped_string }} {{ c | to_json_escaped_string }}"
    renderer = PromptRenderer(PromptTemplate(text=template, path="<test>"))
    assert renderer.render({"a": 'Kraków "old"\n', "b": None, "c": 40.0}) == '"Kraków \\"old\\"\\n" null 40.0'
    # no autoescape, and exactly one final newline dropped
    plain = PromptRenderer(PromptTemplate(text="<b>{{ x }}</b>\n\n", path="<test>"))
    assert plain.render({"x": "&"}) == "<b>&</b>\n"


# ---------------------------------------------------------------------------------------------- (b) goldens

CASES = {
    "not_in_flow": ("e2e_tests/du/general_du.yml::greeting and baggage questions", 2),
    "inside_flow": ("e2e_tests/cars/rental_car_du.yml::car rental step by step with buttons", 3),
    "called_flow_with_buttons": ("e2e_tests/cars/rental_car_du.yml::car rental step by step with buttons", 7),
    "after_correction": ("e2e_tests/hotels/hotel_du.yml::correct the number of nights", 5),
    "after_cancel": ("e2e_tests/hotels/hotel_du.yml::small talk and then cancel the hotel search", 4),
    "during_clarification": ("e2e_tests/e2e/assertion_checks.yml::assert clarification of a vague booking request", 2),
    "guard_guest": ("e2e_tests/flights/flight_change_du.yml::guest user asks to change a flight", 1),
    "guard_logged_in": ("e2e_tests/flights/flight_change_du.yml::free flight change step by step", 1),
    "pinned_datetime": ("e2e_tests/hotels/hotel_du.yml::hotel step by step with a pinned date", 2),
    "fixed_datetime": ("e2e_tests/excursions/excursion_du.yml::excursion details asked one by one", 4),
}


def _date_arguments(name: str) -> list[str]:
    if name == "pinned_datetime":
        return []  # the test's mocked_datetime fixture
    if name == "fixed_datetime":
        return ["--datetime", "2027-11-28T08:30:00"]
    return ["--no-datetime"]


def _render_cli(capsys, test: str, step: int, *extra: str) -> str:
    capsys.readouterr()
    assert main(["render-prompt", test, "--step", str(step), *extra]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


@pytest.mark.parametrize("syntax", ["v1", "v2"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_prompts(capsys, name, syntax):
    test, step = CASES[name]
    out = _render_cli(capsys, test, step, "--command-syntax", syntax, *_date_arguments(name))
    path = GOLDEN / f"{name}_{syntax}.txt"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(out, encoding="utf-8")
    assert path.exists(), f"{path} missing; run RECIPE_UPDATE_GOLDEN=1 pytest {__file__}"
    assert out == path.read_text(encoding="utf-8")


def test_guard_hides_and_shows_change_flight(capsys):
    guest = _render_cli(capsys, *CASES["guard_guest"], "--no-datetime")
    member = _render_cli(capsys, *CASES["guard_logged_in"], "--no-datetime")
    assert '"name":"change_flight"' not in guest and '"name":"explain_login"' in guest
    assert '"name":"change_flight"' in member and '"name":"explain_login"' not in member


# ---------------------------------------------------------------------------------------------- (c) state, dates


def test_state_prints_the_stack_and_slots_as_json(capsys):
    data = json.loads(_render_cli(capsys, *CASES["after_correction"], "--state"))
    assert data["step"] == 5 and data["user_message"] == "a suite would be lovely"
    assert data["stack"] == [{"flow": "book_hotel", "kind": "user", "step": "book_hotel_4_collect_room_type"}]
    assert data["slots"]["num_nights"] == 5.0 and data["slots"]["num_guests"] == 3.0
    assert data["transcript"][-1] == {
        "speaker": "AI",
        "text": "What kind of room would you like?",
        "buttons": ["Single", "Double", "Twin", "Suite"],
    }
    assert data["commands"] == [{"command": "set slot", "name": "room_type", "value": "suite", "extractor": "LLM"}]
    assert "change_flight" not in data["startable_flows"]


def _date_lines(prompt: str) -> list[str]:
    return [line for line in prompt.splitlines() if line.startswith("Now: ")]


def test_datetime_is_deterministic_per_conversation_and_seed_and_never_the_wall_clock(capsys, monkeypatch):
    import recipe.prompt as prompt_module

    class NoClock(datetime):
        @classmethod
        def now(cls, tz=None):
            raise AssertionError("the wall clock was read")

        @classmethod
        def utcnow(cls):
            raise AssertionError("the wall clock was read")

        @classmethod
        def today(cls):
            raise AssertionError("the wall clock was read")

    monkeypatch.setattr(prompt_module, "datetime", NoClock)
    first = _date_lines(_render_cli(capsys, *CASES["inside_flow"]))
    again = _date_lines(_render_cli(capsys, *CASES["inside_flow"]))
    same_conversation_other_turn = _date_lines(_render_cli(capsys, CASES["inside_flow"][0], 5))
    other_conversation = _date_lines(_render_cli(capsys, *CASES["after_correction"]))
    other_seed = _date_lines(_render_cli(capsys, *CASES["inside_flow"], "--seed", "7"))
    assert len(first) == 1
    assert first == again == same_conversation_other_turn
    assert first != other_conversation and first != other_seed

    policy = DatetimePolicy(seed=42)
    assert policy.for_conversation("a.yml::x") == policy.for_conversation("a.yml::x")
    dates = {policy.for_conversation(f"a.yml::case {i}").date() for i in range(20)}
    assert len(dates) > 15  # varied across conversations


def test_mocked_datetime_fixed_datetime_and_no_datetime(capsys):
    pinned = _date_lines(_render_cli(capsys, *CASES["pinned_datetime"]))
    assert pinned == ["Now: Thursday 05 March 2026, 14:05"]
    # the test's own mocked_datetime is what the runtime shows for that test, even with --datetime
    assert _date_lines(_render_cli(capsys, *CASES["pinned_datetime"], "--datetime", "2030-01-01T00:00:00")) == pinned
    fixed = _date_lines(_render_cli(capsys, *CASES["inside_flow"], "--datetime", "2027-11-28T08:30:00"))
    assert fixed == ["Now: Sunday 28 November 2027, 08:30"]
    assert _date_lines(_render_cli(capsys, *CASES["pinned_datetime"], "--no-datetime")) == []
    v1 = _render_cli(capsys, *CASES["pinned_datetime"], "--command-syntax", "v1")
    assert "Today is Thursday, 05 March 2026, 14:05.\n" in v1


@pytest.mark.parametrize(
    ("syntax", "knowledge"), [("v1", "SearchAndReply()"), ("v2", "provide info"), ("v3", "search and reply")]
)
def test_our_templates_offer_every_command_in_the_syntax_the_labels_use(capsys, syntax, knowledge):
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
        Syntax,
        format_command,
    )

    prompt = _render_cli(capsys, *CASES["inside_flow"], "--command-syntax", syntax, "--no-datetime")
    assert knowledge in prompt
    # each command kind the bundled tests teach, in the words its completion is written in
    for command in (CancelFlow(), ChitChat(), Knowledge(), SkipQuestion(), RepeatLastBotMessages()):
        assert format_command(command, Syntax(syntax)) in prompt, command
    # the handoff command only for releases whose parser reads it (up to 3.15)
    handoff = format_command(HumanHandoff(), Syntax(syntax))
    assert handoff not in prompt
    older = _render_cli(
        capsys, *CASES["inside_flow"], "--command-syntax", syntax, "--no-datetime", "--rasa-version", "3.15"
    )
    assert (
        older.replace(
            handoff + (": the user wants a human" if syntax == "v1" else ": the user asks for a human") + "\n", ""
        )
        == prompt
    )
    for command in (StartFlow("x"), SetSlot("x", "y"), Clarify(("a", "b"))):
        text = format_command(command, Syntax(syntax))  # StartFlow(x) / start flow x, disambiguate flows a b, ...
        keyword = text.split("(")[0] if syntax == "v1" else " ".join(text.split()[:2])
        assert keyword in prompt, keyword


def test_a_users_own_template_is_used_as_is(capsys, tmp_path):
    template = tmp_path / "mine.jinja2"
    template.write_text(
        textwrap.dedent("""\
        {{ current_flow }}|{{ current_slot }}|{% for slot in flow_slots %}{{ slot.name }}={{ slot.value }};{% endfor %}
        {{ user_message }}
    """),
        encoding="utf-8",
    )
    out = _render_cli(capsys, *CASES["after_correction"], "--prompt-template", str(template))
    assert out == (
        "book_hotel|room_type|hotel_city=Kraków;hotel_checkin_date=12 May;num_nights=5.0;num_guests=3.0;"
        "room_type=undefined;confirm_hotel_booking=undefined;\n"
        "a suite would be lovely\n"
    )
