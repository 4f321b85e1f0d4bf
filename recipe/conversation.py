"""Replaying a test case turn by turn, and checking the result against what the test itself asserts.

`replay_test_case` is the one place where a test conversation meets the tracker: fixtures and stubs are applied,
every turn (button payloads included) changes the state, and for each user turn we keep the state *before* it,
which is what that turn's prompt is rendered from. The bot messages the test lists after a user turn are the
transcript's authority (they are what the assistant said); the tracker's own simulation fills in where the test is
silent, and any disagreement between the two is reported as a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recipe.commands import Command
from recipe.project import Project
from recipe.tracker import (
    DEFAULT_RESPONSES,
    GENERATED_ANSWER,
    GENERATED_PLACEHOLDERS,
    BotMessage,
    DialogueState,
    DialogueTracker,
    TurnEvents,
    TurnEvidence,
    is_button_payload,
    render_response,
    says,
)
from recipe.types import NO_VALUE, BotStep, SlotCheckStep, TestCase, UserStep


@dataclass
class Turn:
    number: int  # 1-based position among the test's user turns
    step_index: int  # index in test_case.steps
    step: UserStep
    text: str  # what the user said (a paraphrase when replaying a stitched conversation)
    state: DialogueState  # before this turn: what the prompt is rendered from
    commands: list[Command]
    is_payload: bool
    events: TurnEvents
    bot_messages: list[BotMessage]
    slot_checks: list[SlotCheckStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    slots_after: dict[str, Any] = field(default_factory=dict)
    # Where the replay contradicts the test's own bot turns and assertions after this turn: the state the next
    # turn's prompt is rendered from is then wrong.
    disagreements: list[str] = field(default_factory=list)
    inferences: list[str] = field(default_factory=list)  # what the replay read from the test's bot turns


def state_disagrees(turns: list[Turn], number: int) -> bool:
    """Is the state before turn `number` contradicted by the test (the previous turn disagreed)?"""
    return number > 1 and bool(turns[number - 2].disagreements)


CommandSource = Callable[[int, UserStep], list[Command] | None]


def _resolve_bot_step(project: Project, step: BotStep, slots: dict[str, Any]) -> BotMessage:
    if step.text is not None:
        return BotMessage(step.text)
    if step.utter in GENERATED_PLACEHOLDERS and step.utter not in project.domain.responses:
        return BotMessage(GENERATED_ANSWER, (), step.utter)
    # the variation the tracker would say (conditional ones by the slots), rendered as the runtime renders it
    return render_response(project, step.utter or "", slots) or BotMessage(None, (), step.utter)


def listed_bot_messages(
    project: Project, step: UserStep, bot_steps: list[BotStep], simulated: list[BotMessage], slots: dict[str, Any]
) -> list[BotMessage] | None:
    """The bot messages the transcript shows after a user turn when the test's list decides them; None: simulated.

    A DU test lists every bot message, so its list is the authority. An E2E test may leave
    messages out (extra bot messages are allowed): when each listed message is among the simulated ones, in
    order, the simulation is the fuller record of what the assistant said; otherwise the test's list wins. A listed
    message that the simulation also said is taken from the simulation, whose text was filled with the slot values
    of the moment it was said (a flow's slots may be reset by the end of the turn).
    """
    if not bot_steps:
        return None
    matched: list[BotMessage | None] = []
    position = 0
    for bot_step in bot_steps:
        for index in range(position, len(simulated)):
            said = simulated[index]
            if says(said, bot_step.utter, bot_step.text):
                matched.append(said)
                position = index + 1
                break
        else:
            matched.append(None)
    if step.commands is None and None not in matched:
        return None
    return [said or _resolve_bot_step(project, s, slots) for s, said in zip(bot_steps, matched)]


@dataclass(frozen=True)
class UserTurnSteps:
    """A user step with what the test lists after it, up to the next user step."""

    number: int  # 1-based among the user steps
    index: int  # position in test_case.steps
    step: UserStep
    following: list  # the BotStep and SlotCheckStep entries after it

    @property
    def bot_steps(self) -> list[BotStep]:
        return [s for s in self.following if isinstance(s, BotStep)]

    @property
    def slot_checks(self) -> list[SlotCheckStep]:
        return [s for s in self.following if isinstance(s, SlotCheckStep)]


def turn_evidence(turn: UserTurnSteps) -> TurnEvidence:
    """What the test says the turn led to: its bot messages and the slot values it checks (see TurnEvidence)."""
    slots: list[tuple[str, Any]] = []
    for assertion in turn.step.assertions:
        if assertion.kind == "slot_was_set":
            for entry in assertion.data if isinstance(assertion.data, list) else [assertion.data]:
                if isinstance(entry, dict) and "value" in entry:
                    slots.append((str(entry["name"]), entry["value"]))
    for check in turn.slot_checks:
        if check.was_set:
            slots.extend((name, value) for name, value in check.slots if value is not NO_VALUE)
    bot = []
    for step in turn.bot_steps:
        if step.utter not in GENERATED_PLACEHOLDERS:
            bot.append((step.utter, step.text))
    for assertion in turn.step.assertions:
        if assertion.kind == "bot_uttered" and isinstance(assertion.data, dict) and assertion.data.get("utter_name"):
            bot.append((str(assertion.data["utter_name"]), None))
    return TurnEvidence(bot=tuple(bot), slots=tuple(slots))


def user_turns(test_case: TestCase) -> list[UserTurnSteps]:
    turns: list[UserTurnSteps] = []
    for index, step in enumerate(test_case.steps):
        if isinstance(step, UserStep):
            turns.append(UserTurnSteps(len(turns) + 1, index, step, []))
        elif turns:
            turns[-1].following.append(step)
    return turns


def new_tracker(project: Project, test_case: TestCase) -> DialogueTracker:
    """A tracker at the start of the test: its stubs, and its fixtures' slots (the date is the prompt's business)."""
    fixture_slots = [(name, value) for name, value in test_case.fixture_slots if name != "mocked_datetime"]
    return DialogueTracker(
        project, test_case.stubs, fixture_slots, conversation_id=test_case.id, action_runner=project.action_server
    )


def show_bot_messages(
    project: Project, tracker: DialogueTracker, turn: UserTurnSteps, events: TurnEvents
) -> list[BotMessage]:
    """Put the bot's answer to this turn into the transcript (the test's list where it decides) and return it."""
    listed = listed_bot_messages(project, turn.step, turn.bot_steps, events.bot_messages, tracker.slots)
    if listed is not None:
        tracker.replace_bot_messages(listed)
        return listed
    return list(events.bot_messages)


def replay_test_case(
    project: Project,
    test_case: TestCase,
    commands_for: CommandSource | None = None,
    texts: dict[int, str] | None = None,
) -> list[Turn]:
    """Replay every step; `commands_for(turn_number, step)` overrides the test's commands, `texts` the wording."""
    tracker = new_tracker(project, test_case)
    turns: list[Turn] = []
    for walk in user_turns(test_case):
        number, step = walk.number, walk.step
        text = (texts or {}).get(number, step.text)
        commands = commands_for(number, step) if commands_for else None
        commands_known = commands is not None or step.commands is not None
        if commands is None:
            commands = step.commands or []
        state = tracker.state()
        payload = is_button_payload(text)
        events = tracker.user_turn(text, [] if payload else list(commands), turn_evidence(walk))
        simulated = [m.utter for m in events.bot_messages if m.utter]
        disagreements = [
            f"{bot_step.location}: the test expects `{bot_step.utter}` after turn {number}; "
            f"the flows would say {simulated or 'nothing'}"
            for bot_step in walk.bot_steps
            if bot_step.utter
            and bot_step.utter not in simulated
            and (bot_step.utter in project.domain.responses or bot_step.utter in DEFAULT_RESPONSES)
        ]
        turn = Turn(
            number=number,
            step_index=walk.index,
            step=step,
            text=text,
            state=state,
            commands=list(commands),
            is_payload=payload,
            events=events,
            bot_messages=show_bot_messages(project, tracker, walk, events),
            slot_checks=walk.slot_checks,
            warnings=list(events.warnings),
            slots_after=dict(tracker.slots),
            inferences=list(events.inferences),
        )
        if commands_known:
            disagreements += assertion_problems(turn)
        turn.disagreements = disagreements
        turn.warnings += disagreements
        turns.append(turn)
    return turns


# ---------------------------------------------------------------------------------------------- checks


def _same_value(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return str(actual).lower() == str(expected).lower()
    try:
        return float(actual) == float(expected)
    except (TypeError, ValueError):
        return str(actual).casefold() == str(expected).casefold()


def _flow_ids(data: Any) -> tuple[str, list[str]]:
    if isinstance(data, str):
        return "all", [data]
    if isinstance(data, list):
        return "all", [str(x) for x in data]
    return str(data.get("operator", "any")), [str(x) for x in data.get("flow_ids") or []]


def assertion_problems(turn: Turn) -> list[str]:
    """Where the tracker's picture of this turn contradicts the test's assertions and slot checks."""
    problems: list[str] = []
    events = turn.events
    set_values = dict(events.slots_set)  # the last value each slot was set to in this turn

    def was_set(name: str, value: Any = NO_VALUE) -> bool:
        # As the runtime's checks: did any slot event of this turn set it (to that value)? A rejection that
        # resets the slot afterwards does not undo that.
        return any(
            slot == name and (value is NO_VALUE or _same_value(actual, value)) for slot, actual in events.slots_set
        )

    for assertion in turn.step.assertions:
        where, kind, data = assertion.location, assertion.kind, assertion.data
        if kind == "flow_started":
            operator, flows = _flow_ids(data)
            hit = [f for f in flows if f in events.flows_started]
            if (operator == "all" and len(hit) != len(flows)) or (operator != "all" and not hit):
                problems.append(f"{where}: flow_started {flows}, tracker started {events.flows_started}")
        elif kind in ("flow_completed", "flow_cancelled"):
            flow_id = data.get("flow_id") if isinstance(data, dict) else data
            happened = events.flows_completed if kind == "flow_completed" else events.flows_cancelled
            if flow_id not in [f for f, _ in happened]:
                problems.append(f"{where}: {kind} {flow_id}, tracker saw {happened}")
        elif kind == "slot_was_set":
            for entry in data if isinstance(data, list) else [data]:
                name = entry.get("name")
                if name not in set_values:
                    problems.append(f"{where}: slot_was_set {name}, tracker set {list(set_values)}")
                elif "value" in entry and not was_set(name, entry["value"]):
                    problems.append(f"{where}: slot {name} = {entry['value']!r}, tracker has {set_values[name]!r}")
        elif kind == "slot_was_not_set":
            for entry in data if isinstance(data, list) else [data]:
                name = entry.get("name")
                if was_set(name, entry["value"] if "value" in entry else NO_VALUE):
                    problems.append(f"{where}: slot_was_not_set {name}, but the tracker set it")
        elif kind == "pattern_clarification_contains":
            operator, flows = _flow_ids(data)
            offered = set(events.clarification_options)
            if (operator == "any" and not offered & set(flows)) or (operator != "any" and not set(flows) <= offered):
                problems.append(f"{where}: clarification {flows}, tracker offered {events.clarification_options}")
        elif kind == "action_executed":
            if data not in events.actions:
                problems.append(f"{where}: action_executed {data}, tracker ran {events.actions}")
        elif kind == "bot_uttered" and isinstance(data, dict) and data.get("utter_name"):
            if data["utter_name"] not in [m.utter for m in events.bot_messages]:
                problems.append(
                    f"{where}: bot_uttered {data['utter_name']}, tracker said {[m.utter for m in events.bot_messages]}"
                )
    for check in turn.slot_checks:
        # Like the runtime's checks: did a slot event of this turn set it (a later reset does not undo that)?
        for name, value in check.slots:
            actual = set_values.get(name)
            did_set = was_set(name, value)
            if check.was_set and not did_set:
                problems.append(
                    f"{check.location}: slot_was_set {name}={value if value is not NO_VALUE else ''}, "
                    f"tracker set {actual!r}"
                )
            if not check.was_set and did_set:
                problems.append(f"{check.location}: slot_was_not_set {name}, tracker set it to {actual!r}")
    return problems


def mocked_datetime(test_case: TestCase) -> Any:
    """The `mocked_datetime` fixture slot of a test case, if it sets one."""
    values = [value for name, value in test_case.fixture_slots if name == "mocked_datetime"]
    return values[-1] if values else None
