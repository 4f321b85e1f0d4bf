"""Reading the domain (slots, responses, actions), merged over any number of YAML files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from recipe.errors import InputError, Problems
from recipe.types import Button, Domain, Location, ResponseVariation, Slot
from recipe.yamlio import line_of, load_yaml, plain

log = logging.getLogger("recipe")

SLOT_TYPES = ("text", "bool", "categorical", "float", "any", "list")

# Slots every CALM assistant has: set by the built-in patterns and the dialogue manager.
# The runtime's default domain lets the command generator fill the slots its own pattern flows collect.
_LLM_FILLED_BUILTINS = {"confirm_correction", "interrupted_flow_to_continue", "continue_interrupted_flow_confirmation"}
BUILTIN_SLOTS: dict[str, Slot] = {
    name: Slot(name=name, type=slot_type, mappings=("from_llm",) if name in _LLM_FILLED_BUILTINS else ("controlled",))
    for name, slot_type in {
        "confirm_correction": "bool",
        "requested_slot": "any",
        "return_value": "any",
        "dialogue_stack": "any",
        "flow_hashes": "any",
        "session_started_metadata": "any",
        "route_session_to_calm": "bool",
        "silence_timeout": "float",
        "consecutive_silence_timeouts": "float",
        "interrupted_flow_to_continue": "text",
        "continue_interrupted_flow_confirmation": "bool",
        "handoff_reason": "text",
    }.items()
}


def _read_slot(name: str, body: Any, path: str, line: int | None) -> Slot:
    if not isinstance(body, dict):
        raise InputError(path, line, f"slot `{name}` must be a mapping with a `type`")
    slot_type = str(body.get("type", ""))
    if slot_type not in SLOT_TYPES:
        raise InputError(
            path,
            line_of(body, "type") or line,
            f"slot `{name}` has type `{slot_type or 'nothing'}`; expected one of {', '.join(SLOT_TYPES)}",
        )
    values: tuple[str, ...] = ()
    if slot_type == "categorical":
        raw_values = body.get("values")
        if not isinstance(raw_values, list) or not raw_values:
            raise InputError(path, line, f"categorical slot `{name}` needs a non-empty `values` list")
        values = tuple(str(value) for value in raw_values if str(value) != "__other__")
    mappings = []
    for mapping in body.get("mappings") or []:
        if not isinstance(mapping, dict) or "type" not in mapping:
            raise InputError(path, line_of(body, "mappings") or line, f"slot `{name}`: each mapping needs a `type`")
        mappings.append(str(mapping["type"]))
    return Slot(
        name=name,
        type=slot_type,
        values=values,
        mappings=tuple(mappings),
        initial_value=plain(body.get("initial_value")),
        location=Location(path, line),
    )


def _read_variation(item: Any, path: str, name: str, line: int | None) -> ResponseVariation:
    if isinstance(item, str):  # tolerate the shorthand `- Some text`
        return ResponseVariation(text=item)
    if not isinstance(item, dict):
        raise InputError(path, line, f"response `{name}`: each variation must be a mapping with `text`")
    buttons = []
    for button in item.get("buttons") or []:
        if not isinstance(button, dict) or "title" not in button:
            raise InputError(path, line_of(item, "buttons"), f"response `{name}`: each button needs a `title`")
        buttons.append(Button(title=str(button["title"]), payload=str(button.get("payload", ""))))
    text = item.get("text")
    condition = item.get("condition")
    if isinstance(condition, list):  # the deprecated form: every {type: slot, name, value} must hold
        if not all(isinstance(c, dict) and "name" in c for c in condition):
            raise InputError(
                path,
                line_of(item, "condition"),
                f"response `{name}`: each `condition` entry needs a `name` (and a `value`)",
            )
        condition = tuple((str(c["name"]), plain(c.get("value"))) for c in condition)
    elif condition is not None:
        condition = str(condition)
    metadata = plain(item.get("metadata"))
    return ResponseVariation(
        text=None if text is None else str(text),
        buttons=tuple(buttons),
        condition=condition or None,
        channel=None if item.get("channel") is None else str(item["channel"]),
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def _shape_error(data: Any, shown_path: str) -> InputError | None:
    if not isinstance(data, dict):
        return InputError(shown_path, 1, "a domain file must be a mapping (slots, responses, actions, ...)")
    for key in ("slots", "responses"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return InputError(shown_path, line_of(data, key), f"`{key}` must be a mapping of name to definition")
    if data.get("actions") is not None and not isinstance(data["actions"], list):
        return InputError(shown_path, line_of(data, "actions"), "`actions` must be a list of action names")
    return None


def read_domain(paths: list[Path], shown: dict[Path, str], problems: Problems | None = None) -> Domain:
    """Merge the domain files in `paths` (in order; a later definition replaces an earlier one with a warning).
    Mistakes go to `problems` (when given), so that every slot's and response's mistakes show in one run."""
    collected = problems if problems is not None else Problems()
    slots: dict[str, Slot] = {}
    responses: dict[str, list[ResponseVariation]] = {}
    actions: set[str] = set()
    for path in paths:
        shown_path = shown.get(path, str(path))
        data = None
        with collected.catch():
            data = load_yaml(path)
        if data is None:
            continue
        shape_error = _shape_error(data, shown_path)
        if shape_error is not None:
            collected.add(shape_error)
            continue
        for name, body in (data.get("slots") or {}).items():
            if name in slots:
                log.warning("%s: slot `%s` is defined again; the later definition wins", shown_path, name)
            with collected.catch():
                slots[str(name)] = _read_slot(str(name), body, shown_path, line_of(data["slots"], name))
        for name, variations in (data.get("responses") or {}).items():
            with collected.catch():
                if not isinstance(variations, list):
                    raise InputError(
                        shown_path, line_of(data["responses"], name), f"response `{name}` must be a list of variations"
                    )
                responses[str(name)] = [
                    _read_variation(item, shown_path, str(name), line_of(variations, index))
                    for index, item in enumerate(variations)
                ]
        for action in data.get("actions") or []:
            actions.add(str(next(iter(action))) if isinstance(action, dict) else str(action))
    if problems is None:
        collected.raise_if_any()
    return Domain(slots=slots, responses=responses, actions=actions, files=[shown.get(p, str(p)) for p in paths])
