"""Annotation: the commands behind every user turn of a test case.

Three sources, in order of trust:
  1. commands written in the test (`commands:`), used as they are;
  2. `--annotator assertions`: commands derived from what the test asserts (flows started, slots set, patterns,
     expected responses), found by replaying candidate command sets through the tracker and keeping the one that
     reproduces the test's expectations; fully offline;
  3. `--annotator llm`: a teacher LLM given the rendered prompt (see `recipe.prepare`), checked against the test's
     assertions where it has any.
A turn whose commands cannot be determined is reported with its reason and left out of the training rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from recipe.commands import (
    NEWEST_RASA_VERSION,
    CancelFlow,
    ChitChat,
    Clarify,
    Command,
    HumanHandoff,
    Knowledge,
    RasaVersion,
    RepeatLastBotMessages,
    SetSlot,
    SkipQuestion,
    StartFlow,
    Syntax,
    parse_model_output,
    unsupported_reason,
)
from recipe.conversation import (
    Turn,
    UserTurnSteps,
    assertion_problems,
    new_tracker,
    show_bot_messages,
    turn_evidence,
    user_turns,
)
from recipe.llm import LLMCallFailed, LLMClient
from recipe.project import Project, canonical_command, command_problem
from recipe.prompt import PromptRenderer, prompt_variables
from recipe.tracker import DialogueTracker, is_button_payload, says, startable_flows
from recipe.types import NO_VALUE, BotStep, SlotCheckStep, TestCase, UserStep

PATTERN_COMMANDS: dict[str, Command] = {
    "pattern_chitchat": ChitChat(),
    "pattern_search": Knowledge(),
    "pattern_human_handoff": HumanHandoff(),
    "pattern_skip_question": SkipQuestion(),
    "pattern_repeat_bot_messages": RepeatLastBotMessages(),
    "pattern_cancel_flow": CancelFlow(),
}
_NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}


NLU_REASON = "set by NLU, not the command generator"
PAYLOAD_REASON = "a button payload: applied directly, never sent to the command generator"


@dataclass
class TurnAnnotation:
    number: int
    commands: list[Command] | None  # None: could not be determined (see reason)
    source: str  # "test" | "assertions" | "llm" | "payload" | "nlu"
    reason: str | None = None

    @property
    def trains(self) -> bool:
        """Is this a turn of the LLM command generator, with known commands? Only those become rows; payload and
        NLU turns change the dialogue state but the generator never answers them."""
        return self.commands is not None and self.source not in ("payload", "nlu")


def _known_turn(step: UserStep, number: int, version: RasaVersion = NEWEST_RASA_VERSION) -> TurnAnnotation | None:
    """A turn whose commands need no annotator: a button payload, a turn NLU answered, or written commands. A
    written command the target Rasa release no longer parses (`hand over` from 3.16 on) makes the turn unknown: the
    runtime would drop it and answer `cannot handle`, so neither the label nor the state after it is the runtime's."""
    if is_button_payload(step.text):
        return TurnAnnotation(number, [], "payload", PAYLOAD_REASON)
    if step.commands is not None and step.nlu_commands:
        return TurnAnnotation(number, list(step.commands), "nlu", NLU_REASON)
    unsupported = [reason for c in step.commands or [] if (reason := unsupported_reason(c, version))]
    if unsupported:
        return TurnAnnotation(number, None, "test", unsupported[0])
    if step.commands is not None:
        return TurnAnnotation(number, list(step.commands), "test")
    return None


@dataclass
class TestAnnotation:
    test_case: TestCase
    turns: list[TurnAnnotation] = field(default_factory=list)

    __test__ = False

    def commands_for(self, number: int, step: UserStep) -> list[Command] | None:
        return self.turns[number - 1].commands


def _numbers_in(text: str) -> list[str]:
    """Every number the user wrote, in digits or (small numbers) in words."""
    numbers = [m.replace(",", ".") for m in re.findall(r"(?<![\w.])-?\d+(?:[.,]\d+)?(?![\w])", text)]
    numbers += [str(n) for word, n in _NUMBER_WORDS.items() if re.search(rf"\b{word}\b", text, re.IGNORECASE)]
    return numbers


def _expected_slots(step: UserStep, checks: list[SlotCheckStep]) -> list[tuple[str, Any]]:
    expected: list[tuple[str, Any]] = []
    for assertion in step.assertions:
        if assertion.kind == "slot_was_set":
            for entry in assertion.data if isinstance(assertion.data, list) else [assertion.data]:
                expected.append((str(entry.get("name")), entry.get("value", NO_VALUE)))
    for check in checks:
        if check.was_set:
            expected.extend(check.slots)
    return expected


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _explicit_commands(step: UserStep) -> tuple[list[Command], list[str]]:
    """Commands the assertions name directly (flows and patterns started, clarification, cancellation), and the
    flows of an `operator: any` flow_started assertion, of which the turn started one (which one is searched)."""
    commands: list[Command] = []
    any_of: list[str] = []
    clarify: list[str] = []
    for assertion in step.assertions:
        data = assertion.data
        if assertion.kind == "flow_started":
            flows = [data] if isinstance(data, str) else data.get("flow_ids", []) if isinstance(data, dict) else data
            operator = data.get("operator", "any") if isinstance(data, dict) else "all"
            if operator == "any" and len(flows) > 1:
                any_of.extend(str(flow_id) for flow_id in flows)
                continue
            for flow_id in flows:
                if flow_id in PATTERN_COMMANDS:
                    commands.append(PATTERN_COMMANDS[flow_id])
                elif not str(flow_id).startswith("pattern_"):
                    commands.append(StartFlow(str(flow_id)))
        elif assertion.kind == "flow_cancelled":
            commands.append(CancelFlow())
        elif assertion.kind == "pattern_clarification_contains":
            clarify = list(data.get("flow_ids", []) if isinstance(data, dict) else data)
    if clarify:
        commands.append(Clarify(tuple(clarify)))
    unique: list[Command] = []
    for command in commands:
        if command not in unique:
            unique.append(command)
    return unique, any_of


def _simulate(
    tracker: DialogueTracker,
    text: str,
    commands: list[Command],
    step: UserStep,
    number: int,
    following: list,
    project: Project,
) -> tuple[int, DialogueTracker]:
    """Replay one turn on a copy of the tracker; the score is how many expectations it misses."""
    trial = tracker.fork()
    state = trial.state()
    events = trial.user_turn(text, commands, turn_evidence(UserTurnSteps(number, 0, step, following)))
    turn = Turn(
        number=number,
        step_index=0,
        step=step,
        text=text,
        state=state,
        commands=commands,
        is_payload=False,
        events=events,
        bot_messages=events.bot_messages,
        slot_checks=[s for s in following if isinstance(s, SlotCheckStep)],
        slots_after=dict(trial.slots),
    )
    misses = len(assertion_problems(turn))
    for expected in following:
        if isinstance(expected, BotStep):
            misses += not any(says(message, expected.utter, expected.text) for message in events.bot_messages)
    return misses, trial


def annotate_from_assertions(project: Project, test_case: TestCase) -> TestAnnotation:
    """Derive every turn's commands from the test's own expectations, replaying as we go."""
    tracker = new_tracker(project, test_case)
    annotation = TestAnnotation(test_case)
    for walk in user_turns(test_case):
        step, number, following = walk.step, walk.number, walk.following
        result = _known_turn(step, number, project.rasa_version) or _derive_turn(
            project, tracker, step, number, following
        )
        show_bot_messages(
            project, tracker, walk, tracker.user_turn(step.text, result.commands or [], turn_evidence(walk))
        )
        annotation.turns.append(result)
    return _uncertain_after_unknown(annotation)


def _derive_turn(
    project: Project, tracker: DialogueTracker, step: UserStep, number: int, following: list
) -> TurnAnnotation:
    slot_commands: list[Command] = []
    unknown_values: list[str] = []
    expected = [
        (name, value)
        for name, value in _expected_slots(step, [s for s in following if isinstance(s, SlotCheckStep)])
        if (slot := project.slot(name)) is not None and slot.llm_fillable
    ]
    # Slots set by actions or set_slots steps are left out above: the command generator does not set them.
    nameless = [name for name, value in expected if value is NO_VALUE or value is None]
    numbers = _numbers_in(step.text)
    for name, value in expected:
        if value is NO_VALUE or value is None:
            # A slot check without a value: only a lone number for a lone number slot can be read off safely.
            slot = project.slot(name)
            if len(nameless) == 1 and slot is not None and slot.type == "float" and len(set(numbers)) == 1:
                value = numbers[0]
            else:
                unknown_values.append(name)
                continue
        command: Command = SetSlot(name, _value_text(value))
        if command not in slot_commands:
            slot_commands.append(command)
    # A flow whose guard fails (`if: False` included) can only have been started by a link or call step.
    startable = {flow.id for flow in startable_flows(project, tracker.slots)}
    named, any_of = _explicit_commands(step)
    explicit = [c for c in named if not isinstance(c, StartFlow) or c.flow in startable]
    # A flow the test says was started may have been started by a link or call, not by a command.
    candidates = [explicit + [StartFlow(f)] for f in any_of if f in startable] + [explicit]
    candidates += [[c for c in explicit if c != started] for started in explicit if isinstance(started, StartFlow)]
    if not explicit and not any_of:
        # Nothing named: which flow or pattern (if any) explains the responses the test expects?
        candidates += [[StartFlow(f.id)] for f in startable_flows(project, tracker.slots)]
        candidates += [[command] for command in PATTERN_COMMANDS.values()]
    best: tuple[int, list[Command]] | None = None
    for extra in candidates:
        commands = extra + slot_commands
        misses, _ = _simulate(tracker, step.text, commands, step, number, following, project)
        if best is None or misses < best[0]:
            best = (misses, commands)
        if misses == 0:
            break
    assert best is not None
    misses, commands = best
    if unknown_values:
        return TurnAnnotation(
            number, None, "assertions", f"the test names slot(s) {', '.join(unknown_values)} without a value"
        )
    if misses:
        return TurnAnnotation(
            number, None, "assertions", f"no command set reproduces the test's expectations ({misses} missed)"
        )
    if not commands:
        return TurnAnnotation(number, None, "assertions", "the test's expectations imply no command")
    for command in commands:
        # What the test asserts may be a value the assistant rejects, as the user said it: a valid label.
        problem = command_problem(command, project, from_any_source=True) or unsupported_reason(
            command, project.rasa_version
        )
        if problem:
            return TurnAnnotation(number, None, "assertions", f"derived command {command.as_dict()}: {problem}")
    return TurnAnnotation(number, [canonical_command(c, project) for c in commands], "assertions")


def _uncertain_after_unknown(annotation: TestAnnotation) -> TestAnnotation:
    """Once a turn's commands are unknown, the dialogue state after it is a guess: later turns yield no rows."""
    first = next((turn.number for turn in annotation.turns if turn.commands is None), None)
    if first is not None:
        for turn in annotation.turns[first:]:
            if turn.commands is not None and turn.source not in ("payload", "nlu"):
                turn.commands = None
                turn.reason = f"comes after turn {first}, whose commands are unknown (the state from there is a guess)"
    return annotation


# ---------------------------------------------------------------------------------------------- teacher LLM


async def annotate_with_teacher(
    project: Project,
    test_case: TestCase,
    client: LLMClient,
    renderer: PromptRenderer,
    syntax: Syntax,
    when: datetime | None,
) -> TestAnnotation:
    """Ask the teacher for the commands of every turn the test gives none for, turn by turn (each prompt needs the
    state the previous turns left). Where the test asserts something, the teacher's commands must reproduce it, or
    the turn is reported and left out; the replay then goes on with the commands derived from the assertions."""
    tracker = new_tracker(project, test_case)
    annotation = TestAnnotation(test_case)
    for walk in user_turns(test_case):
        step, number, following = walk.step, walk.number, walk.following
        replay_commands: list[Command] = []
        known = _known_turn(step, number, project.rasa_version)
        if known is not None:
            result = known
        else:
            prompt = renderer.render(prompt_variables(project, tracker.state(), step.text, when))
            try:
                answer = await client.chat([{"role": "user", "content": prompt}])
            except LLMCallFailed as error:
                if error.fails_every_call:
                    raise
                answer = None
                result = TurnAnnotation(number, None, "llm", f"teacher call failed: {error.last_error}")
            if answer is not None:
                result = _judge_teacher_answer(project, tracker, step, number, following, answer.text, syntax)
            if result.commands is None:
                derived = _derive_turn(project, tracker, step, number, following)
                replay_commands = derived.commands or []
        commands = result.commands if result.commands is not None else replay_commands
        show_bot_messages(project, tracker, walk, tracker.user_turn(step.text, commands, turn_evidence(walk)))
        annotation.turns.append(result)
    return _uncertain_after_unknown(annotation)


def _judge_teacher_answer(
    project: Project, tracker: DialogueTracker, step: UserStep, number: int, following: list, text: str, syntax: Syntax
) -> TurnAnnotation:
    """Accept the teacher's answer only if it parses, fits the assistant and reproduces the test's assertions."""
    parsed = parse_model_output(text, syntax, custom=project.custom_commands)
    if parsed.unparsed_lines:
        return TurnAnnotation(number, None, "llm", f"teacher answer not parseable: {parsed.unparsed_lines[0]!r}")
    commands = list(parsed.commands)
    for command in commands:
        problem = command_problem(command, project)
        if problem:
            return TurnAnnotation(number, None, "llm", f"teacher command {command.as_dict()}: {problem}")
    has_expectations = step.assertions or any(isinstance(s, SlotCheckStep) for s in following)
    if has_expectations:
        misses, _ = _simulate(
            tracker, step.text, commands, step, number, [s for s in following if not isinstance(s, BotStep)], project
        )
        if misses:
            return TurnAnnotation(
                number, None, "llm", f"teacher commands disagree with the test's assertions ({misses} missed)"
            )
    return TurnAnnotation(number, [canonical_command(c, project) for c in commands], "llm")
