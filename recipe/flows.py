"""Reading flows files (`flows:` YAML) into `Flow` objects with every step's `next` resolved.

Nested step lists under `then:`/`else:` are flattened the way a flow engine does it: a branch jumps to the first
step of its list, and the last step of any list without `next` ends the flow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from recipe.errors import InputError, Problems
from recipe.types import END, Branch, Flow, Location, Step
from recipe.yamlio import line_of, plain

STEP_KINDS = ("collect", "action", "set_slots", "link", "call", "noop")
_FLOW_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_FLOW_KEYS = {
    "name",
    "description",
    "if",
    "always_include_in_prompt",
    "nlu_trigger",
    "persisted_slots",
    "steps",
    "run_pattern_completed",
    "file_path",
}


def _condition_text(value: Any) -> str:
    # `if: False` arrives as a bool; guards and conditions are kept as pypred source text.
    return str(value) if not isinstance(value, str) else value


class _FlowReader:
    """Builds one flow; keeps the counter for positional step ids and the pending `next` references."""

    def __init__(self, flow_id: str, path: str):
        self.flow_id = flow_id
        self.path = path
        self.steps: dict[str, Step] = {}
        self.next_lines: dict[str, int | None] = {}  # step id -> line of its `next:`, for unknown-target errors
        self.index = 0

    def error(self, node: Any, message: str, key: Any = None) -> InputError:
        return InputError(self.path, line_of(node, key) or line_of(node), message)

    def read_steps(self, items: Any, where: Any) -> list[str]:
        if not isinstance(items, list) or not items:
            raise self.error(where, f"flow `{self.flow_id}`: `steps` must be a non-empty list of steps")
        ids: list[str] = []
        raw_next: list[tuple[Step, Any, Any]] = []
        for position, item in enumerate(items):
            step, next_node = self.read_step(item, items, position)
            ids.append(step.id)
            raw_next.append((step, next_node, item))
            if next_node is not None and step.kind != "link":
                # Branch steps are read (and numbered) right after their step, depth first, as the engine numbers
                # them: `a` with a branch `b`, then `c` gives a=0, b=1, c=2.
                self.next_lines[step.id] = line_of(item, "next")
                step.next = self.read_next(next_node, item)
        for position, (step, next_node, item) in enumerate(raw_next):
            following = ids[position + 1] if position + 1 < len(ids) else END
            if step.kind == "link":
                if next_node is not None:
                    raise self.error(item, f"flow `{self.flow_id}`: a `link` step cannot have `next`")
                if position + 1 < len(ids):
                    raise self.error(item, f"flow `{self.flow_id}`: a `link` step must be the last step of its list")
                step.next = [Branch(None, END)]
            elif next_node is None:
                step.next = [Branch(None, following)]
        return ids

    def read_step(self, item: Any, parent: Any, position: int) -> tuple[Step, Any]:
        if not isinstance(item, dict):
            raise InputError(self.path, line_of(parent, position), f"flow `{self.flow_id}`: a step must be a mapping")
        kinds = [kind for kind in STEP_KINDS if kind in item]
        if len(kinds) != 1:
            found = ", ".join(str(key) for key in item) or "nothing"
            raise self.error(
                item,
                f"flow `{self.flow_id}`: step has {found}; expected exactly one of {', '.join(STEP_KINDS)}",
            )
        kind = kinds[0]
        value = item[kind]
        default_id = f"{self.flow_id}_{self.index}_{kind}" + (f"_{value}" if isinstance(value, str) else "")
        self.index += 1
        step_id = str(item.get("id") or default_id)
        if step_id in self.steps:
            raise self.error(item, f"flow `{self.flow_id}`: duplicate step id `{step_id}`")
        step = Step(id=step_id, kind=kind, next=[], location=Location(self.path, line_of(item)))
        if kind in ("collect", "action", "link", "call"):
            if not isinstance(value, str) or not value:
                raise self.error(item, f"flow `{self.flow_id}`: `{kind}` needs a name", kind)
            setattr(step, kind, value)
        if kind == "collect":
            description = item.get("description")
            step.description = None if description is None else str(description)
            step.ask_before_filling = bool(item.get("ask_before_filling", False))
            step.reset_after_flow_ends = bool(item.get("reset_after_flow_ends", True))
            step.utter = item.get("utter")
            for rejection in item.get("rejections") or []:
                if not isinstance(rejection, dict) or "if" not in rejection or "utter" not in rejection:
                    raise InputError(
                        self.path,
                        line_of(rejection) or line_of(item, "rejections"),
                        f"flow `{self.flow_id}`: a rejection needs `if` and `utter`",
                    )
                step.rejections.append((_condition_text(rejection["if"]), str(rejection["utter"])))
        elif kind == "set_slots":
            if not isinstance(value, list):
                raise self.error(item, "`set_slots` must be a list of {slot: value}", kind)
            for entry in value:
                if not isinstance(entry, dict) or len(entry) != 1:
                    raise self.error(item, "`set_slots` entries must be single {slot: value} mappings", kind)
                ((slot, slot_value),) = entry.items()
                step.set_slots.append((str(slot), plain(slot_value)))
        elif kind == "call":
            step.mcp_server = None if item.get("mcp_server") is None else str(item["mcp_server"])
            step.mapping = plain(item["mapping"]) if isinstance(item.get("mapping"), dict) else None
            step.exit_if = [_condition_text(c) for c in item.get("exit_if") or []]
        elif kind == "noop" and "next" not in item:
            raise self.error(item, f"flow `{self.flow_id}`: a `noop` step needs `next`")
        self.steps[step_id] = step
        return step, item.get("next")

    def read_next(self, node: Any, step_node: Any) -> list[Branch]:
        if isinstance(node, str):
            return [Branch(None, node)]
        if not isinstance(node, list) or not node:
            raise self.error(step_node, "`next` must be a step id, END, or a list of if/then and else", "next")
        branches: list[Branch] = []
        for arm in node:
            if not isinstance(arm, dict):
                raise self.error(node, "each `next` entry must be {if: ..., then: ...} or {else: ...}")
            if "if" in arm:
                if "then" not in arm:
                    raise self.error(arm, "an `if` branch needs `then`")
                branches.append(Branch(_condition_text(arm["if"]), self.read_target(arm["then"], arm)))
            elif "else" in arm:
                branches.append(Branch(None, self.read_target(arm["else"], arm)))
            else:
                raise self.error(arm, "each `next` entry must have `if`/`then` or `else`")
        if branches[-1].condition is not None:
            branches.append(Branch(None, END))  # no else: a flow engine ends the flow
        return branches

    def read_target(self, node: Any, arm: Any) -> str:
        if isinstance(node, str):
            return node
        return self.read_steps(node, arm)[0]


def read_flows_file(path: Path, data: Any, shown_path: str, problems: Problems | None = None) -> list[Flow]:
    """All flows of one parsed flows file, in file order; a flow with a mistake is recorded in `problems` (when
    given) and left out, so every flow's mistakes are reported in one run."""
    flows_node = data.get("flows")
    if flows_node is None:
        return []
    if not isinstance(flows_node, dict):
        raise InputError(shown_path, line_of(data, "flows"), "`flows` must be a mapping of flow id to flow")
    collected = problems if problems is not None else Problems()
    flows = []
    for flow_id, body in flows_node.items():
        with collected.catch():
            flows.append(_read_flow(str(flow_id), body, flows_node, shown_path))
    if problems is None:
        collected.raise_if_any()
    return flows


def _read_flow(flow_id: str, body: Any, flows_node: Any, shown_path: str) -> Flow:
    line = line_of(flows_node, flow_id)
    if not _FLOW_ID.fullmatch(flow_id):
        raise InputError(shown_path, line, f"invalid flow id `{flow_id}`: use letters, digits, `_` and `-`")
    if not isinstance(body, dict):
        raise InputError(shown_path, line, f"flow `{flow_id}` must be a mapping with description and steps")
    unknown = [key for key in body if key not in _FLOW_KEYS]
    if unknown:
        raise InputError(
            shown_path,
            line_of(body, unknown[0]),
            f"flow `{flow_id}`: unknown key `{unknown[0]}`; expected one of {', '.join(sorted(_FLOW_KEYS))}",
        )
    if not body.get("description") and not flow_id.startswith("pattern_"):
        raise InputError(shown_path, line, f"flow `{flow_id}` has no `description` (required)")
    reader = _FlowReader(flow_id, shown_path)
    ids = reader.read_steps(body.get("steps"), body)
    for step in reader.steps.values():
        for branch in step.next:
            if branch.target != END and branch.target not in reader.steps:
                raise InputError(
                    shown_path,
                    reader.next_lines.get(step.id) or step.location.line,
                    f"flow `{flow_id}`: `next` points to unknown step `{branch.target}`; expected a step id "
                    "of this flow or END",
                )
    guard = body.get("if")
    triggers = []
    for trigger in body.get("nlu_trigger") or []:
        intent = trigger.get("intent") if isinstance(trigger, dict) else trigger
        triggers.append(str(intent.get("name") if isinstance(intent, dict) else intent))
    persisted = body.get("persisted_slots") or []
    return Flow(
        id=flow_id,
        description=str(body.get("description") or ""),
        name=None if body.get("name") is None else str(body.get("name")),
        guard=None if guard is None else _condition_text(guard),
        always_include_in_prompt=bool(body.get("always_include_in_prompt", False)),
        persisted_slots=[str(slot) for slot in persisted],
        run_pattern_completed=bool(body.get("run_pattern_completed", True)),
        nlu_triggers=triggers,
        steps=reader.steps,
        first_step=ids[0],
        location=Location(shown_path, line),
    )
