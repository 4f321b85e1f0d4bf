"""Validating predicted commands against the assistant and the dialogue state: keep what it can act on, drop the
rest with a reason each (rasa-formats §5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from recipe.commands import Clarify, Command, ContinueAgent, RestartAgent, SetSlot, StartFlow
from recipe.grammar import fillable_slots, startable_flow_ids
from recipe.project import Project, command_problem
from recipe.tracker import DialogueState, startable_flows


@dataclass(frozen=True)
class Dropped:
    """A line that did not parse (`item` is the text) or a command the assistant cannot act on, and why."""

    item: Command | str
    reason: str

    @property
    def unparsed(self) -> bool:
        return isinstance(self.item, str)


def validate_commands(
    commands: Sequence[Command],
    project: Project,
    state: DialogueState | None = None,
    fillable: frozenset[str] | None = None,
) -> tuple[list[Command], list[Dropped]]:
    """Keep the commands this assistant can act on; drop the others with a reason.

    Dropped: unknown flows, flows that cannot be started now (their `if` guard fails in `state`), unknown slots,
    values a slot's type cannot hold (categorical, bool, float), slots no flow collects or the LLM may not fill,
    clarification options that are not flows (the rest of the clarification is kept).
    """
    fillable = fillable if fillable is not None else frozenset(fillable_slots(project))
    if state is not None:
        startable, why_not = (
            {flow.id for flow in startable_flows(project, state.slots)},
            "its `if` condition is false now",
        )
    else:
        startable, why_not = set(startable_flow_ids(project)), "it is reached only through a link or call"
    kept: list[Command] = []
    dropped: list[Dropped] = []
    for command in commands:
        if isinstance(command, Clarify):
            known = tuple(option for option in command.options if option in startable)
            dropped += [
                Dropped(command, f"clarify option `{option}` is not a flow that can be started")
                for option in command.options
                if option not in known
            ]
            if known:
                kept.append(command if known == command.options else Clarify(known))
            continue
        reason = command_problem(command, project)
        if reason is None and isinstance(command, StartFlow) and command.flow not in startable:
            reason = f"flow `{command.flow}` cannot be started: {why_not}"
        if reason is None and isinstance(command, SetSlot) and command.slot not in fillable:
            reason = f"slot `{command.slot}` is not filled by the command generator (no flow collects it from the LLM)"
        if reason is None and state is not None:
            reason = _agent_command_problem(command, state)
        if reason is None:
            kept.append(command)
        else:
            dropped.append(Dropped(command, reason))
    return kept, dropped


def _agent_command_problem(command: Command, state: DialogueState) -> str | None:
    """As the runtime's command clean-up: `continue agent` needs a running agent, `restart agent x` a completed x."""
    if isinstance(command, ContinueAgent) and state.active_agent is None:
        return "`continue agent` while no agent is running; the runtime drops it"
    if isinstance(command, RestartAgent):
        last = {agent: kind for kind, agent, _ in state.agent_log}
        if last.get(command.agent) != "completed":
            return f"`restart agent {command.agent}`: the agent has not completed; the runtime drops it"
    return None
