"""A dialogue state tracker that replays a test conversation the way a CALM flow engine would.

After each user turn it applies the turn's commands, then advances the flows on the dialogue stack until the bot
waits for the user (a collect step asks its question) or nothing is left to run. Before every user turn we therefore
know what the command generator's prompt needs: the stack, the slot being asked, every slot value and what the bot
said.

Conversation patterns (cancel, correction, clarification, chitchat, knowledge, skip, handoff, repeat, completion,
continuing an interrupted flow) are flows too: the project's own `pattern_*` flows when it defines them, else our
defaults below. Where the engine would do something the tracker cannot know (a custom action without a stub), it
records a warning and carries on with the slots unchanged.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import jinja2

from recipe.commands import (
    CancelFlow,
    CannotHandle,
    ChitChat,
    Clarify,
    Command,
    ContinueAgent,
    HumanHandoff,
    Knowledge,
    RepeatLastBotMessages,
    RestartAgent,
    SetSlot,
    SkipQuestion,
    StartFlow,
)
from recipe.conditions import ConditionError, evaluate
from recipe.domain import BUILTIN_SLOTS
from recipe.project import Project, canonical_slot_value
from recipe.types import (
    END,
    Branch,
    Button,
    Flow,
    Location,
    ResponseVariation,
    Slot,
    Step,
    Stub,
)

# Our wording for the built-in responses; a project overrides any of them by defining the response in its domain.
DEFAULT_RESPONSES: dict[str, str] = {
    "utter_flow_cancelled_rasa": "Okay, I have stopped that.",
    "utter_can_do_something_else": "Is there anything else I can help you with?",
    "utter_flow_continue_interrupted": "Let's get back to what we were doing.",
    "utter_corrected_previous_input": "Got it, I have updated that.",
    "utter_clarification_options_rasa": "Which of these did you mean: {clarification_options}?",
    "utter_skip_question_answer": "I need this piece of information to carry on, so let's complete this step.",
    "utter_human_handoff_not_available": "I can't connect you to a person right now. Can I help with anything else?",
    "utter_ask_rephrase": "Sorry, I didn't get that. Could you say it another way?",
    "utter_internal_error_rasa": "Sorry, something went wrong. Please try again.",
    # Said by the slot-rejection step when a value does not fit the slot's type; `{{value}}` is the value (Jinja).
    "utter_categorical_slot_rejection": "Sorry, {{value}} is not one of the options I can take. Please pick one.",
    "utter_boolean_slot_rejection": "Sorry, I need a yes or a no here; {{value}} is neither.",
    "utter_float_slot_rejection": "Sorry, I need a number here, and {{value}} is not one.",
}
# The built-in responses written as Jinja templates (`metadata: {template: jinja}` at runtime); the rest use `{name}`.
JINJA_DEFAULT_RESPONSES = frozenset(
    {"utter_categorical_slot_rejection", "utter_boolean_slot_rejection", "utter_float_slot_rejection"}
)

# Actions whose result is generated text at runtime: the transcript shows the test's `bot:` text, if any.
GENERATED_ACTIONS = {"action_trigger_chitchat", "action_trigger_search", "utter_free_chitchat_response"}
# What the transcript shows for such an answer when the test does not give its text: the runtime shows the real
# answer; leaving the line out would put two user messages in a row, which the runtime never shows.
GENERATED_ANSWER = "[generated answer]"
GENERATED_PLACEHOLDERS = {"placeholder_generated_answer"}  # the DU-test name for "any generated answer"


@dataclass(frozen=True)
class BotMessage:
    text: str | None  # None: generated at runtime and not known here
    buttons: tuple[Button, ...] = ()
    utter: str | None = None


@dataclass(frozen=True)
class TranscriptLine:
    speaker: str  # "USER" or "AI"
    text: str | None
    buttons: tuple[Button, ...] = ()
    utter: str | None = None  # the response name of a bot line, when known (kept when the bot repeats itself)
    agent: str | None = None  # said by this sub-agent (the transcript shows its name instead of `AI`)


@dataclass
class Frame:
    flow_id: str
    kind: str  # "user" (started by a command), "called" (by a call step), "pattern"
    step_id: str
    step_done: bool = False  # has the step at step_id finished? (then resume at its next)
    asked: set[str] = field(default_factory=set)  # collect steps whose question was asked in this frame
    visited: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)  # pattern context, e.g. clarification options


@dataclass
class TurnEvents:
    """What happened during one user turn, in the vocabulary of E2E assertions."""

    flows_started: list[str] = field(default_factory=list)
    flows_completed: list[tuple[str, str]] = field(default_factory=list)  # (flow id, last step id)
    flows_cancelled: list[tuple[str, str]] = field(default_factory=list)
    slots_set: list[tuple[str, Any]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    bot_messages: list[BotMessage] = field(default_factory=list)
    clarification_options: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inferences: list[str] = field(default_factory=list)  # what the replay took from the test's own bot turns


@dataclass(frozen=True)
class TurnEvidence:
    """What a test says happened after a user turn: the bot's messages (a response name or a text) and the slots
    it checks. Where the tracker cannot know what an action did (no stub, no action server), this decides."""

    bot: tuple[tuple[str | None, str | None], ...] = ()  # (response name, text), in order
    slots: tuple[tuple[str, Any], ...] = ()  # (slot, value) the test says the turn set


@dataclass(frozen=True)
class FrameView:
    flow_id: str
    kind: str
    step_id: str


@dataclass(frozen=True)
class DialogueState:
    """An immutable picture of the conversation before a user turn: what the prompt is rendered from."""

    slots: dict[str, Any]
    stack: tuple[FrameView, ...]
    transcript: tuple[TranscriptLine, ...]
    started_flows: tuple[str, ...] = ()  # user flows started so far in the conversation, first start first
    # Every start of a user flow (restarts and links included) with the number of transcript lines before it: flow
    # retrieval lists the flows started within the last messages, latest first.
    flow_starts: tuple[tuple[str, int], ...] = ()
    active_agent: tuple[str, str] | None = None  # (agent, flow that called it) while a sub-agent runs
    # ("started" | "completed", agent, flow) in order, as the runtime's AgentStarted / AgentCompleted events
    agent_log: tuple[tuple[str, str, str], ...] = ()

    def slot_value(self, name: str) -> Any:
        return self.slots.get(name)


@dataclass(frozen=True)
class ActionCall:
    """A custom action the flows run and no stub covers, with what an action server is told about the dialogue."""

    action: str
    conversation_id: str  # the sender id: the test case id, the same on every run
    slots: dict[str, Any]
    transcript: tuple[TranscriptLine, ...]  # up to and including the current user message
    latest_message: str | None  # the current user message (None before the first one)
    stack: tuple[FrameView, ...]
    turn_slots: tuple[tuple[str, Any], ...] = ()  # the slot events of the current turn so far, in order


@dataclass(frozen=True)
class ActionOutcome:
    """What a custom action did: slot events in order, messages (a text, or a response name to render), and the
    action to run next (`FollowupAction`), if any."""

    slots: tuple[tuple[str, Any], ...] = ()
    messages: tuple[BotMessage, ...] = ()  # BotMessage(text=None, utter=name): the domain response `name`
    followup: str | None = None


class ActionRunner(Protocol):
    """Runs custom actions for the tracker (for real: `recipe.actions.ActionServer`)."""

    def run(self, call: ActionCall) -> ActionOutcome: ...

    def usage_summary(self) -> dict[str, Any]: ...


_PATTERN_FLOWS_YAML: dict[str, list[tuple[str, ...]]] = {
    # pattern id -> steps (kind, argument[, condition]); run when the pattern is triggered unless the project
    # overrides it. A step with a condition runs only when it holds (else the flow goes on after it).
    "pattern_cancel_flow": [("action", "action_cancel_flow"), ("action", "utter_flow_cancelled_rasa")],
    "pattern_completed": [("action", "utter_can_do_something_else")],
    "pattern_continue_interrupted": [("action", "utter_flow_continue_interrupted")],
    "pattern_correction": [
        ("action", "action_correct_flow_slot"),
        ("action", "utter_corrected_previous_input", "not context.is_reset_only"),  # a reset only asks again
    ],
    "pattern_clarification": [("action", "action_clarify_flows"), ("action", "utter_clarification_options_rasa")],
    "pattern_chitchat": [("action", "action_trigger_chitchat")],
    "pattern_search": [("action", "action_trigger_search")],
    "pattern_skip_question": [("action", "utter_skip_question_answer")],
    "pattern_human_handoff": [("action", "utter_human_handoff_not_available")],
    "pattern_repeat_bot_messages": [("action", "action_repeat_bot_messages")],
    "pattern_cannot_handle": [("action", "utter_ask_rephrase")],
    "pattern_internal_error": [("action", "utter_internal_error_rasa")],
}


def _default_pattern(pattern_id: str) -> Flow:
    steps: dict[str, Step] = {}
    spec = _PATTERN_FLOWS_YAML[pattern_id]
    ids = [f"{pattern_id}_{index}_{entry[0]}_{entry[1]}" for index, entry in enumerate(spec)]
    ids.append(END)
    for index, (kind, arg, *_) in enumerate(spec):
        branches = [Branch(None, ids[index + 1])]
        if index + 1 < len(spec) and len(spec[index + 1]) > 2:  # the next step is conditional: else skip it
            branches = [Branch(spec[index + 1][2], ids[index + 1]), Branch(None, ids[index + 2])]
        steps[ids[index]] = Step(id=ids[index], kind=kind, next=branches, location=Location("<built-in>"), action=arg)
    return Flow(
        id=pattern_id,
        description="",
        name=None,
        guard=None,
        always_include_in_prompt=False,
        persisted_slots=[],
        run_pattern_completed=False,
        nlu_triggers=[],
        steps=steps,
        first_step=ids[0],
        location=Location("<built-in>"),
    )


_FORMAT_PLACEHOLDER = re.compile(r"\{([^\n{}]+?)\}")  # the runtime's `{name}` placeholder
_SET_SLOTS_PAYLOAD = re.compile(r"^/SetSlots\((.*)\)\s*$")
MAX_FOLLOWUPS = 10  # the same followup action within one turn
MAX_STEPS_PER_TURN = 500  # a flow that loops without asking anything is a bug in the flows; stop and say so


def parse_set_slots_payload(text: str) -> list[tuple[str, str]] | None:
    """`/SetSlots(a=x, b=y)` -> [("a", "x"), ("b", "y")]; None when the text is not such a payload."""
    match = _SET_SLOTS_PAYLOAD.match(text.strip())
    if not match:
        return None
    pairs = []
    for part in match.group(1).split(","):
        name, equals, value = part.partition("=")
        if equals:
            pairs.append((name.strip(), value.strip().strip("'\"")))
    return pairs


def is_button_payload(text: str) -> bool:
    """A payload turn (`/SetSlots(...)`, `/intent`) never reaches the command generator."""
    stripped = text.strip()
    return stripped.startswith("/") and re.fullmatch(r"/[A-Za-z_][\w-]*(\(.*\)|\{.*\})?", stripped) is not None


class DialogueTracker:
    """Replays one conversation; `state()` gives the picture before the next user turn."""

    def __init__(
        self,
        project: Project,
        stubs: dict[str, Stub] | None = None,
        fixture_slots: list[tuple[str, Any]] | None = None,
        conversation_id: str = "recipe",
        action_runner: ActionRunner | None = None,
    ):
        self.project = project
        self.stubs = stubs or {}
        self.conversation_id = conversation_id
        self.action_runner = action_runner
        self.started_flows: list[str] = []
        self.flow_starts: list[tuple[str, int]] = []
        self.evidence: TurnEvidence | None = None  # set per turn by the replay; never by a forked trial run
        self._unknown_action = False  # did an action run this turn whose effect nobody knows?
        self._forced_target: str | None = None  # a trial run of one branch (see `_branch_the_test_shows`)
        self.slots: dict[str, Any] = {
            name: slot.initial_value for name, slot in project.domain.slots.items() if slot.initial_value is not None
        }
        self.stack: list[Frame] = []
        self.active_agent: tuple[str, str] | None = None  # (agent, calling flow) of the sub-agent running now
        self.agent_log: list[tuple[str, str, str]] = []
        self._agent_addressed = False  # did this user turn go to the active agent (`continue agent`)?
        self._startable: set[str] = set()
        self.transcript: list[TranscriptLine] = []
        self.events = TurnEvents()
        for name, value in fixture_slots or []:
            self.slots[name] = self._typed(name, value)

    def fork(self) -> DialogueTracker:
        """A copy whose dialogue state can diverge; the project, stubs and action runner are shared, not copied."""
        shared = {"project", "stubs", "action_runner"}
        clone = copy.copy(self)
        for name, value in vars(self).items():
            if name not in shared:
                setattr(clone, name, copy.deepcopy(value))
        return clone

    # ------------------------------------------------------------------------------------------ views

    def state(self) -> DialogueState:
        return DialogueState(
            slots=copy.deepcopy(self.slots),
            stack=tuple(FrameView(f.flow_id, f.kind, f.step_id) for f in self.stack),
            transcript=tuple(self.transcript),
            started_flows=tuple(self.started_flows),
            flow_starts=tuple(self.flow_starts),
            active_agent=self.active_agent,
            agent_log=tuple(self.agent_log),
        )

    def flow(self, flow_id: str) -> Flow:
        if flow_id in self.project.flows:
            return self.project.flows[flow_id]
        return _default_pattern(flow_id)

    # ------------------------------------------------------------------------------------------ a user turn

    def user_turn(self, text: str, commands: list[Command], evidence: TurnEvidence | None = None) -> TurnEvents:
        """The user says `text`; the command generator (or a payload) gives `commands`; the flows run. With
        `evidence` (the test's own bot turns and slot checks), what unknown actions did is read from the test."""
        self.events = TurnEvents()
        self.evidence = evidence
        self._unknown_action = False
        self.transcript.append(TranscriptLine("USER", text))
        payload = parse_set_slots_payload(text)
        if payload is not None:
            commands = [SetSlot(name, value) for name, value in payload]
        elif is_button_payload(text):
            commands = self._intent_commands(text.strip()[1:].split("(")[0].split("{")[0])
        # As the runtime's command processor: with an agent running, a turn without commands continues it.
        self._agent_addressed = self.active_agent is not None and (
            not commands or any(isinstance(c, ContinueAgent) for c in commands)
        )
        self._apply_commands(commands)
        self._advance()
        if self.active_agent is not None and not self._agent_addressed and not self._agent_waits_in_call():
            self._complete_agent()  # a restarted agent the user has moved on from
        return self.events

    def replace_bot_messages(self, messages: list[BotMessage]) -> None:
        """Make the transcript show `messages` as the bot's answer to the last user turn (the test is authority)."""
        while self.transcript and self.transcript[-1].speaker == "AI":
            self.transcript.pop()
        agent = self.active_agent[0] if self.active_agent else None
        self.transcript.extend(TranscriptLine("AI", m.text, m.buttons, m.utter, agent) for m in messages)

    def _intent_commands(self, intent: str) -> list[Command]:
        commands: list[Command] = [
            StartFlow(flow.id) for flow in self.project.user_flows if intent in flow.nlu_triggers
        ]
        return commands[:1]

    def _apply_commands(self, commands: list[Command]) -> None:
        # Order as a flow engine applies them: cancel, then slots (corrections), then new flows, then patterns.
        # A flow whose guard fails on the slots before this turn cannot be started (the runtime drops the command).
        self._startable = {flow.id for flow in startable_flows(self.project, self.slots)}
        if any(isinstance(c, CancelFlow) for c in commands):
            self._cancel_top_flow()
        corrections = []
        for command in commands:
            if isinstance(command, SetSlot):
                if self._is_correction(command):
                    corrections.append(command)
                else:
                    self._set_slot(command.slot, command.value)
        if corrections:
            self._correct(corrections)
        for command in commands:
            match command:
                case StartFlow(flow=flow_id):
                    self._start_user_flow(flow_id)
                case Clarify(options=options):
                    valid = [o for o in options if o in self.project.flows and not self.project.flows[o].is_pattern]
                    if len(valid) == 1:
                        self._start_user_flow(valid[0])
                    elif valid:
                        self._push_pattern("pattern_clarification", options=valid)
                case ChitChat():
                    self._push_pattern("pattern_chitchat")
                case Knowledge():
                    self._push_pattern("pattern_search")
                case SkipQuestion():
                    self._push_pattern("pattern_skip_question")
                case HumanHandoff():
                    self._push_pattern("pattern_human_handoff")
                case RepeatLastBotMessages():
                    self._push_pattern("pattern_repeat_bot_messages")
                case CannotHandle():
                    self._push_pattern("pattern_cannot_handle")
                case RestartAgent(agent=agent):
                    self._restart_agent(agent)
        if not commands and not self.stack:
            self._push_pattern("pattern_cannot_handle")

    # ------------------------------------------------------------------------------------------ slots

    def _typed(self, name: str, value: Any) -> Any:
        """Coerce a command's string value to the slot's type, as the runtime does when it applies the command."""
        slot: Slot | None = self.project.slot(name)
        if value is None or slot is None or not isinstance(value, str):
            return value
        canonical = canonical_slot_value(slot, value)
        if slot.type == "bool" and canonical is not None:
            return canonical == "True"
        if slot.type == "float" and canonical is not None:
            return float(value)
        return canonical if canonical is not None else value

    def _set_slot(self, name: str, value: Any) -> None:
        typed = self._typed(name, value)
        self.slots[name] = typed
        self.events.slots_set.append((name, typed))

    def _is_correction(self, command: SetSlot) -> bool:
        """Setting a slot that already holds another value, collected by a flow on the stack."""
        current = self.slots.get(command.slot)
        if current is None or command.value is None:
            return False
        if str(current).casefold() == str(self._typed(command.slot, command.value)).casefold():
            return False
        return any(self._collect_step_of(frame, command.slot) for frame in self.stack if frame.kind != "pattern")

    def _collect_step_of(self, frame: Frame, slot: str) -> Step | None:
        for step in self.flow(frame.flow_id).steps.values():
            if step.collect == slot and step.id in frame.visited and step.id != frame.step_id:
                return step
        return None

    def _correct(self, corrections: list[SetSlot]) -> None:
        """As the runtime's correct-slots command: push the correction pattern with the new values in its context.
        They are applied only when the pattern runs `action_correct_flow_slot` (the default pattern at once; one that
        asks for confirmation first may never run it, and the old values stay)."""
        proposed = {c.slot: self._typed(c.slot, c.value) for c in corrections}
        # Reset only: every collect step of these slots (in any flow) asks before filling, so the flow asks again.
        collects = [s for flow in self.project.flows.values() for s in flow.collect_steps() if s.collect in proposed]
        reset_flow_id = reset_step_id = None
        for frame in reversed(self.stack):
            found = [self._collect_step_of(frame, name) for name in proposed] if frame.kind != "pattern" else []
            steps = [s for s in found if s is not None]
            if steps:
                reset_flow_id = frame.flow_id
                reset_step_id = min(steps, key=lambda s: frame.visited.index(s.id)).id
                break
        self._push_pattern(
            "pattern_correction",
            is_reset_only=all(s.ask_before_filling for s in collects),
            corrected_slots={name: {"value": value, "filled_by": None} for name, value in proposed.items()},
            reset_flow_id=reset_flow_id,
            reset_step_id=reset_step_id,
            new_slot_values=list(proposed.values()),
        )

    def _apply_correction(self, pattern: Frame) -> None:
        """`action_correct_flow_slot`: set the corrected slots and rewind every flow below the correction pattern to
        its earliest corrected collect step, so the steps after it run again (the runtime resets the stack to the
        moment that question was asked)."""
        corrected = pattern.context.get("corrected_slots") or {}
        for name, entry in corrected.items():
            self._set_slot(name, entry.get("value") if isinstance(entry, dict) else entry)
        below = next((i for i, f in enumerate(self.stack) if f is pattern), len(self.stack))
        for frame in self.stack[:below]:
            if frame.kind == "pattern":
                continue
            found = [self._collect_step_of(frame, name) for name in corrected]
            steps = [s for s in found if s is not None]
            if steps:
                earliest = min(steps, key=lambda s: frame.visited.index(s.id))
                frame.visited = frame.visited[: frame.visited.index(earliest.id)]
                frame.step_id, frame.step_done = earliest.id, False

    # ------------------------------------------------------------------------------------------ stack

    def _start_user_flow(self, flow_id: str) -> None:
        if any(frame.flow_id == flow_id for frame in self.stack):
            return  # already active: the engine drops the command
        if flow_id not in self._startable:
            guard = self.flow(flow_id).guard
            self.events.warnings.append(
                f"flow `{flow_id}` cannot be started now (its guard `if: {guard}` is false); the command is dropped"
            )
            return
        flow = self.flow(flow_id)
        self.stack.append(Frame(flow_id, "user", flow.first_step))
        self.events.flows_started.append(flow_id)
        self._record_start(flow_id)

    def _record_start(self, flow_id: str) -> None:
        if flow_id not in self.started_flows:
            self.started_flows.append(flow_id)
        self.flow_starts.append((flow_id, len(self.transcript)))

    def _push_pattern(self, pattern_id: str, **context: Any) -> None:
        flow = self.flow(pattern_id)
        context = {**self._pattern_context(pattern_id, context), **context}
        self.stack.append(Frame(pattern_id, "pattern", flow.first_step, context=context))
        self.events.flows_started.append(pattern_id)

    def _readable_name(self, flow_id: str) -> str:
        """The runtime's readable name of a flow: its `name`, else its id."""
        flow = self.project.flows.get(flow_id)
        return (flow.name if flow is not None else None) or flow_id

    def _pattern_context(self, pattern_id: str, given: dict[str, Any]) -> dict[str, Any]:
        """The context keys the runtime's frame for this pattern has (Rasa Pro 3.21), from what the tracker passes
        (`options`, `canceled_flow`, `previous_flow`: flow ids, kept alongside). Frame ids are not modelled."""
        if pattern_id == "pattern_cancel_flow":
            canceled = given.get("canceled_flow")
            return {
                "canceled_name": self._readable_name(canceled) if canceled else "",
                "canceled_frames": [canceled] if canceled else [],
            }
        if pattern_id == "pattern_clarification":
            names = [self._readable_name(o) for o in given.get("options", [])]
            options = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
            return {"names": names, "clarification_options": options}
        if pattern_id == "pattern_completed":
            previous = given.get("previous_flow")
            return {"previous_flow_name": self._readable_name(previous) if previous else None}
        if pattern_id == "pattern_continue_interrupted":
            ids = [f.flow_id for f in reversed(self.stack) if f.kind == "user"]
            names = [self._readable_name(i) for i in ids]
            previous = given.get("previous_flow")
            return {
                "interrupted_flow_ids": ids,
                "interrupted_flow_names": names,
                "interrupted_flow_options": ", ".join(names[:-1]) + " or " + names[-1]
                if len(names) > 1
                else "".join(names),
                "multiple_flows_interrupted": len(names) > 1,
                # the key of earlier Rasa Pro versions, which project responses still use
                "previous_flow_name": self._readable_name(previous) if previous else None,
            }
        if pattern_id == "pattern_cannot_handle":
            return {"reason": None}
        if pattern_id == "pattern_internal_error":
            return {"error_type": None, "info": {}}
        return {}

    def _frame_context(self, frame: Frame | None) -> dict[str, Any]:
        """A frame's `context` as the runtime's stack shows it to conditions and responses. While a collect step runs,
        the runtime's top frame is its collect-information pattern, whose context is the collecting frame's context
        over the collect step's own keys."""
        if frame is None:
            return {}
        own = {"flow_id": frame.flow_id, "step_id": frame.step_id}
        if frame.kind == "pattern":
            own["type"] = frame.flow_id
        else:
            own.update(type="flow", frame_type="call" if frame.kind == "called" else "regular")
        step = self.flow(frame.flow_id).steps.get(frame.step_id)
        collect: dict[str, Any] = {}
        if step is not None and step.kind == "collect" and not frame.step_done:
            collect = {
                "collect": step.collect,
                "utter": step.utter or f"utter_ask_{step.collect}",
                "collect_action": f"action_ask_{step.collect}",
                "rejections": [{"if": c, "utter": u} for c, u in step.rejections],
            }
        return {**collect, **own, **frame.context}

    def _cancel_top_flow(self) -> None:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index].kind == "user":
                cancelled = self.stack[index:]
                del self.stack[index:]
                for frame in cancelled:
                    if frame.kind != "pattern":
                        self.events.flows_cancelled.append((frame.flow_id, frame.step_id))
                        self._reset_flow_slots(frame.flow_id)
                self._push_pattern("pattern_cancel_flow", canceled_flow=cancelled[0].flow_id)
                return

    def _reset_flow_slots(self, flow_id: str) -> None:
        flow = self.flow(flow_id)
        for step in flow.collect_steps():
            if step.collect and step.reset_after_flow_ends and step.collect not in flow.persisted_slots:
                self.slots.pop(step.collect, None)

    # ------------------------------------------------------------------------------------------ running flows

    def _advance(self) -> None:
        for _ in range(MAX_STEPS_PER_TURN):
            if not self.stack:
                return
            frame = self.stack[-1]
            if frame.step_done:
                self._move_on(frame)
                continue
            if self._run_step(frame, self.flow(frame.flow_id).steps[frame.step_id]):
                return  # the bot waits for the user
        self.events.warnings.append(f"flows ran {MAX_STEPS_PER_TURN} steps without waiting for the user; stopped")

    def _move_on(self, frame: Frame) -> None:
        step = self.flow(frame.flow_id).steps[frame.step_id]
        context = self._frame_context(frame)
        target = next(b.target for b in step.next if b.condition is None or evaluate(b.condition, self.slots, context))
        if self._forced_target is not None:
            target, self._forced_target = self._forced_target, None
        elif self._unknown_action and self.evidence is not None and len({b.target for b in step.next}) > 1:
            target = self._branch_the_test_shows(frame, step, target)
        if target != END:
            frame.step_id, frame.step_done = target, False
            return
        self.stack.pop()
        self.events.flows_completed.append((frame.flow_id, frame.step_id))
        self._reset_flow_slots(frame.flow_id)  # patterns too: a confirmation slot is asked afresh next time
        if frame.kind == "called" and self.stack:
            self.stack[-1].step_done = True  # the caller's `call` step is finished
            return
        if frame.kind == "user":
            below = [f for f in self.stack if f.kind == "user"]
            if below:
                self._push_pattern("pattern_continue_interrupted", previous_flow=below[-1].flow_id)
            elif not self.stack and self.flow(frame.flow_id).run_pattern_completed:
                self._push_pattern("pattern_completed", previous_flow=frame.flow_id)

    def _run_step(self, frame: Frame, step: Step) -> bool:
        """Run one step; True when the bot now waits for the user."""
        if step.id not in frame.visited:
            frame.visited.append(step.id)
        if step.kind == "collect":
            return self._run_collect(frame, step)
        if step.kind == "action":
            self._run_action(frame, step.action or "")
        elif step.kind == "set_slots":
            for name, value in step.set_slots:
                self._set_slot(name, value)
        elif step.kind == "link":
            self.stack.pop()
            self.events.flows_completed.append((frame.flow_id, step.id))
            self._reset_flow_slots(frame.flow_id)
            target = self.flow(step.link or "")
            self.stack.append(Frame(target.id, frame.kind if frame.kind != "called" else "user", target.first_step))
            self.events.flows_started.append(target.id)
            if not target.is_pattern:
                self._record_start(target.id)
            return False
        elif step.kind == "call" and step.mcp_server is not None:
            # An MCP tool (3.14+): nothing runs it here; its output slots are read from the test, as for an action.
            self.events.actions.append(step.call or "")
            self.events.warnings.append(
                f"MCP tool `{step.call}` of server `{step.mcp_server}` is not run; its "
                "output slots are read from the test"
            )
            self._infer_action_effects(step.call or "")
        elif step.kind == "call" and step.call in self.project.agents:
            return self._run_agent(frame, step)
        elif step.kind == "call":
            frame.step_done = False
            target = self.flow(step.call or "")
            self.stack.append(Frame(target.id, "called", target.first_step))
            self.events.flows_started.append(target.id)
            return False
        frame.step_done = True
        return False

    # ------------------------------------------------------------------------------------------ sub-agents

    def _run_agent(self, frame: Frame, step: Step) -> bool:
        """A `call:` step to a sub-agent. The agent talks to the user (its messages are the test's bot turns) until
        its `exit_if` conditions hold; without them, until a user turn is not for it (`continue agent`). True while
        the bot waits for the user."""
        agent = step.call or ""
        if self.active_agent != (agent, frame.flow_id):
            self.active_agent = (agent, frame.flow_id)
            self.agent_log.append(("started", agent, frame.flow_id))
            return True
        if self._agent_addressed:
            # The agent answered this turn: the slots it set (its output) are unknown here, as for an action nothing
            # runs, and are read from the test's slot checks and bot texts of the turn.
            self._infer_action_effects(agent)
        done = all(evaluate(c, self.slots) for c in step.exit_if) if step.exit_if else not self._agent_addressed
        if not done:
            self._agent_addressed = False  # one user turn answered; the next one decides again
            return True
        self._complete_agent()
        frame.step_done = True
        return False

    def _agent_waits_in_call(self) -> bool:
        if self.active_agent is None or not self.stack:
            return False
        top = self.stack[-1]
        step = self.flow(top.flow_id).steps.get(top.step_id)
        return top.flow_id == self.active_agent[1] and step is not None and step.call == self.active_agent[0]

    def _complete_agent(self) -> None:
        assert self.active_agent is not None
        agent, flow_id = self.active_agent
        self.agent_log.append(("completed", agent, flow_id))
        self.active_agent = None

    def _restart_agent(self, agent: str) -> None:
        """`restart agent x` (valid only for an agent that completed): it runs again in the flow that called it."""
        finished = [flow for kind, name, flow in self.agent_log if kind == "completed" and name == agent]
        if not finished or self.active_agent is not None:
            self.events.warnings.append(f"`restart agent {agent}`: the agent has not completed; the runtime drops it")
            return
        self.active_agent = (agent, finished[-1])
        self.agent_log.append(("started", agent, finished[-1]))
        self._agent_addressed = True

    def _run_collect(self, frame: Frame, step: Step) -> bool:
        slot = step.collect or ""
        if step.ask_before_filling and step.id not in frame.asked:
            self.slots.pop(slot, None)  # ask again even when already filled
        elif self.slots.get(slot) is not None:
            type_rejection = self._type_rejection(slot)
            if type_rejection is not None:
                # As the runtime's slot-rejection step: a value the slot's type cannot hold is uttered back,
                # the slot is reset, and the same question is asked again (before the step's own rejections).
                self._say(type_rejection, frame, value=self.slots[slot])
                self._set_slot(slot, None)
            else:
                for condition, utter in step.rejections:
                    if evaluate(condition, self.slots):
                        self._say(utter)
                        self.slots.pop(slot, None)
                        break
                else:
                    frame.step_done = True
                    frame.asked.discard(step.id)  # reaching this step again (a loop, a correction) asks again
                    return False
        frame.asked.add(step.id)
        question = step.utter or f"utter_ask_{slot}"
        if question in self.project.domain.responses or step.utter:
            self._say(question)
        else:
            self._run_action(frame, f"action_ask_{slot}")
        return True

    def _type_rejection(self, name: str) -> str | None:
        """The rejection response for the slot's current value, when its type cannot hold it (None: it can)."""
        slot = self.project.slot(name)
        value = self.slots.get(name)
        if slot is None or value is None:
            return None
        if slot.type == "categorical" and canonical_slot_value(slot, str(value)) is None:
            return "utter_categorical_slot_rejection"
        if slot.type == "bool" and not isinstance(value, bool):
            return "utter_boolean_slot_rejection"
        if slot.type == "float" and not isinstance(value, (int, float)):
            return "utter_float_slot_rejection"
        return None

    def _run_action(self, frame: Frame, action: str) -> None:
        self.events.actions.append(action)
        if action in self.stubs:
            stub = self.stubs[action]
            for name, value in stub.events:
                self._set_slot(name, value)
            self._emit(*(BotMessage(text) for text in stub.responses))
        elif action.startswith("utter_"):
            self._say(action, frame)
        elif action == "action_clarify_flows":
            self.events.clarification_options.extend(frame.context.get("options", []))
        elif action == "action_repeat_bot_messages":
            repeated = self._last_bot_messages()
            if repeated and self._waiting_in_collect(frame):
                repeated = repeated[:-1]  # the last one is the question, which the collect step asks again anyway
            self._emit(*repeated)
        elif action in GENERATED_ACTIONS:
            self._emit(BotMessage(GENERATED_ANSWER, utter=action))
        elif action == "action_correct_flow_slot":
            self._apply_correction(frame)
        elif action in ("action_cancel_flow", "action_listen"):
            pass  # their effect was applied with the command
        elif self.action_runner is not None:
            self._apply_outcome(frame, self.action_runner.run(self._action_call(action)))
        else:
            self.events.warnings.append(
                f"custom action `{action}` has no stub in the test; its slot updates are unknown, slots unchanged"
            )
            self._infer_action_effects(action)

    def _branch_the_test_shows(self, frame: Frame, step: Step, default: str) -> str:
        """At a branch after an action whose effect is unknown: the branch whose continuation says what the test's
        bot turns say. Each branch runs on a fork; ties keep the branch the conditions choose."""
        assert self.evidence is not None
        expected = list(self.evidence.bot)
        index = next(i for i, f in enumerate(self.stack) if f is frame)
        frame.step_done = True
        scores: dict[str, int] = {}
        for target in dict.fromkeys(b.target for b in step.next):
            trial = self.fork()
            trial.evidence = None  # no search inside the trial
            trial.events = TurnEvents()
            trial._forced_target = target
            trial.stack[index].step_done = True  # `_move_on` of this step runs first, and takes the forced target
            trial._advance()
            scores[target] = _matched_in_order(expected, trial.events.bot_messages)
        best = max(scores.values())
        if scores[default] == best:
            return default
        chosen = next(target for target, score in scores.items() if score == best)
        condition = next((b.condition for b in step.next if b.target == chosen), None)
        self.events.inferences.append(
            f"branch `{condition or 'else'}` -> `{chosen}` after step `{step.id}` of "
            f"`{frame.flow_id}`: only it says what the test's bot turns say"
        )
        return chosen

    def _infer_action_effects(self, action: str) -> None:
        """An action nobody can run: take the slot values the test checks for this turn (the commands did not set
        them), and those a bot text of the turn shows through a response template, as the action's effect."""
        self._unknown_action = True
        if self.evidence is None:
            return
        set_now = {name for name, _ in self.events.slots_set}
        found: list[tuple[str, Any, str]] = [(n, v, "the test's slot checks") for n, v in self.evidence.slots]
        for _, text in self.evidence.bot:
            if text:
                found += [(n, v, f"the bot text `{text}`") for n, v in slots_from_bot_text(self.project, text)]
        for name, value, source in found:
            if name in set_now or self.project.slot(name) is None:
                continue
            set_now.add(name)
            self._set_slot(name, value)
            self.events.inferences.append(f"`{name}` = {value!r} after `{action}`, from {source}")

    def _action_call(self, action: str) -> ActionCall:
        latest = next((line.text for line in reversed(self.transcript) if line.speaker == "USER"), None)
        return ActionCall(
            action=action,
            conversation_id=self.conversation_id,
            slots=copy.deepcopy(self.slots),
            transcript=tuple(self.transcript),
            latest_message=latest,
            stack=tuple(FrameView(f.flow_id, f.kind, f.step_id) for f in self.stack),
            turn_slots=tuple(self.events.slots_set),
        )

    def _apply_outcome(self, frame: Frame, outcome: ActionOutcome) -> None:
        for name, value in outcome.slots:
            self._set_slot(name, value)
        for message in outcome.messages:
            if message.text is None and message.utter:
                self._say(message.utter, frame)
            else:
                self._emit(message)
        if outcome.followup:
            # A followup runs like any action (stub, response, built-in or server); a chain that never ends is
            # the server's bug, so it is cut after a few.
            followups = sum(1 for action in self.events.actions if action == outcome.followup)
            if followups < MAX_FOLLOWUPS:
                self._run_action(frame, outcome.followup)
            else:
                self.events.warnings.append(
                    f"`{outcome.followup}` followed up on itself {MAX_FOLLOWUPS} times; stopped"
                )

    def _last_bot_messages(self) -> list[BotMessage]:
        """The bot's last run of messages before the repeat request (user messages without a reply are passed)."""
        lines = self.transcript[:-1]  # before the current user message
        messages: list[BotMessage] = []
        for line in reversed(lines):
            if line.speaker == "AI":
                messages.insert(0, BotMessage(line.text, line.buttons, line.utter))
            elif messages:
                break
        return messages

    def _waiting_in_collect(self, pattern_frame: Frame) -> bool:
        """Is the frame below this pattern waiting for the answer to a collect step's question?"""
        index = next((i for i, f in enumerate(self.stack) if f is pattern_frame), len(self.stack))
        below = [f for f in self.stack[:index] if f.kind != "pattern"]
        if not below:
            return False
        frame = below[-1]
        step = self.flow(frame.flow_id).steps.get(frame.step_id)
        return step is not None and step.kind == "collect" and not frame.step_done and step.id in frame.asked

    def _say(self, utter: str, frame: Frame | None = None, **extra: Any) -> None:
        """Utter a response as the runtime's response generator would: the variation `choose_variation` picks,
        rendered over the slots, the top frame's `context` and `extra` (e.g. a rejected `value`)."""
        frame = frame if frame is not None else (self.stack[-1] if self.stack else None)
        message = render_response(
            self.project, utter, self.slots, self._frame_context(frame), {**self._response_context(frame), **extra}
        )
        if message is None:
            self.events.warnings.append(f"response `{utter}` is not in the domain")
            message = BotMessage(None, (), utter)
        elif utter in self.project.domain.responses and not matching_variations(
            self.project.domain.responses[utter], self.slots
        ):
            self.events.warnings.append(
                f"no variation of response `{utter}` fits the slots; the runtime says "
                "`utter_internal_error_rasa` instead"
            )
        self._emit(message)

    def _response_context(self, frame: Frame | None) -> dict[str, Any]:
        """Our own names for our built-in texts' placeholders, beside the runtime's variables (slots, `context`)."""
        context: dict[str, Any] = {}
        if frame is not None:
            options = frame.context.get("options")
            if options:
                names = [self._readable_name(o) for o in options]
                context["clarification_options"] = ", ".join(names[:-1]) + " or " + names[-1]
            for key in ("canceled_flow", "previous_flow"):
                if key in frame.context:
                    context[key] = self._readable_name(frame.context[key])
        return context

    @staticmethod
    def _fill(text: str, context: dict[str, Any]) -> str:
        """`{name}` placeholders filled as the runtime's format templates are (see `render_text`)."""
        return render_text(text, context)

    def _emit(self, *messages: BotMessage) -> None:
        for message in messages:
            self.events.bot_messages.append(message)
            agent = self.active_agent[0] if self.active_agent else None
            self.transcript.append(TranscriptLine("AI", message.text, message.buttons, message.utter, agent))


def _variation_fits(variation: ResponseVariation, slots: dict[str, Any]) -> bool:
    """Does a conditional variation's `condition` hold? A string is a predicate over `slots.`; the deprecated list
    form compares each slot with its value (strings without regard to case, anything else exactly)."""
    condition = variation.condition
    if isinstance(condition, str):
        try:
            return evaluate(condition, slots)
        except ConditionError:
            return False  # the runtime logs the error and takes the condition as false
    for name, value in condition or ():
        actual = slots.get(name)
        if isinstance(actual, str) and isinstance(value, str):
            if actual.casefold() != value.casefold():
                return False
        elif actual != value:
            return False
    return True


def matching_variations(
    variations: list[ResponseVariation], slots: dict[str, Any], channel: str | None = None
) -> list[ResponseVariation]:
    """The variations the runtime picks from, in file order: conditional ones whose condition holds, for this output
    channel, then unconditional ones for it, then the same without a channel (tests have no channel of their own)."""
    conditional = [v for v in variations if v.condition is not None and _variation_fits(v, slots)]
    default = [v for v in variations if v.condition is None]
    for pool, wanted in ((conditional, channel), (default, channel), (conditional, None), (default, None)):
        group = [v for v in pool if v.channel == wanted]
        if group:
            return group
    return []


def choose_variation(
    variations: list[ResponseVariation], slots: dict[str, Any], channel: str | None = None
) -> ResponseVariation | None:
    """The variation said: the runtime picks at random among `matching_variations`; we take the first of them in
    file order (conditional before unconditional), so that a replay is deterministic. None: none fits."""
    matching = matching_variations(variations, slots, channel)
    return matching[0] if matching else None


def render_text(text: str, variables: dict[str, Any], jinja: bool = False) -> str:
    """A response text as the runtime renders it. Jinja (`metadata: {template: jinja}`): a Jinja2 template over the
    variables (slots by name, `context`, ...); an unset slot is None and shows as `None`, an unknown name as nothing.
    Otherwise `{name}` placeholders: all filled (None as `None`), or, when one names nothing known, none at all."""
    if jinja:
        try:
            return jinja2.Template(text).render(variables)
        except jinja2.TemplateError:
            return text  # the runtime logs the error and sends the text unrendered
    names = _FORMAT_PLACEHOLDER.findall(text)
    try:
        rendered = _FORMAT_PLACEHOLDER.sub(r"{0[\1]}", text).format({n: variables[n] for n in names if n in variables})
        return text.format({}) if "0[" in rendered else rendered
    except (KeyError, IndexError, ValueError, AttributeError):
        return text


def slot_variables(project: Project, slots: dict[str, Any]) -> dict[str, Any]:
    """Every slot by name, as response templates see them: the runtime passes all slots, unset ones as None."""
    names = {**dict.fromkeys(BUILTIN_SLOTS), **dict.fromkeys(project.domain.slots)}
    return {**{name: None for name in names}, **slots}


def render_response(
    project: Project,
    utter: str,
    slots: dict[str, Any],
    context: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> BotMessage | None:
    """The message response `utter` makes now: the domain's variation (`choose_variation`), else our built-in text;
    None when neither has it. A domain response none of whose variations fits says `utter_internal_error_rasa`."""
    variables = {"context": context or {}, **slot_variables(project, slots), **(extra or {})}
    variations = project.domain.responses.get(utter)
    if variations:
        variation = choose_variation(variations, slots)
        if variation is None:
            fallback = render_response(project, "utter_internal_error_rasa", slots, context, extra)
            return BotMessage(fallback.text if fallback else None, (), utter)
        jinja = variation.is_jinja
        text = None if variation.text is None else render_text(variation.text, variables, jinja)
        buttons = tuple(
            Button(render_text(b.title, variables, jinja), render_text(b.payload, variables, jinja))
            for b in variation.buttons
        )
        return BotMessage(text, buttons, utter)
    if utter in DEFAULT_RESPONSES:
        return BotMessage(render_text(DEFAULT_RESPONSES[utter], variables, utter in JINJA_DEFAULT_RESPONSES), (), utter)
    return None


def says(message: BotMessage, utter: str | None, text: str | None) -> bool:
    """Is `message` the expected one: the response `utter` when the test names one, else the exact `text`?"""
    return message.utter == utter if utter else message.text == text


def _matched_in_order(expected: list[tuple[str | None, str | None]], said: list[BotMessage]) -> int:
    """How many of the expected messages appear among `said`, in order."""
    matched, position = 0, 0
    for utter, text in expected:
        for index in range(position, len(said)):
            if says(said[index], utter, text):
                matched, position = matched + 1, index + 1
                break
    return matched


_SLOT_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def slots_from_bot_text(project: Project, text: str) -> list[tuple[str, str]]:
    """Slot values a bot text shows when it fills one of the domain's response templates (`Your {account_type}
    balance is {balance}`); only a template that matches the whole text, and only when exactly one does."""
    found: list[list[tuple[str, str]]] = []
    for variations in project.domain.responses.values():
        for variation in variations:
            template = variation.text or ""
            names = _SLOT_PLACEHOLDER.findall(template)
            if not names or len(set(names)) != len(names):
                continue
            pattern = "".join(
                f"(?P<{part}>.+?)" if i % 2 else re.escape(part)
                for i, part in enumerate(_SLOT_PLACEHOLDER.split(template))
            )
            match = re.fullmatch(pattern, text, flags=re.DOTALL)
            if match and all(project.slot(name) is not None for name in names):
                found.append([(name, match.group(name)) for name in names])
    return found[0] if len(found) == 1 else []


def startable_flows(project: Project, slots: dict[str, Any]) -> list[Flow]:
    """User flows whose guard passes (a guard of `False` means reachable only through link/call)."""
    return [flow for flow in project.user_flows if flow.guard is None or evaluate(flow.guard, slots)]
