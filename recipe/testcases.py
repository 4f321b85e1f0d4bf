"""Reading test files: E2E tests (classic steps or assertions) and dialogue-understanding tests (`commands:`).

A test spec is a file, a folder (nested), or `file.yml::test case name`. Fixtures come from the file and from
`conftest.yml` files in its folder and the folders above it (nearest wins); stubs apply per file, with
`<test case>::<action>` overriding for one test. Commands are read in whatever dialect each line is written in and
checked against the assistant: an unknown flow or slot is a `path:line` error.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from recipe.commands import Command, CommandParseError, SetSlot, Syntax, detect_syntax, parse_command
from recipe.errors import InputError, Problems
from recipe.project import Project, canonical_command, canonical_slot_value, command_problem
from recipe.tracker import parse_set_slots_payload
from recipe.types import (
    NO_VALUE,
    Assertion,
    BotStep,
    Location,
    SlotCheckStep,
    Stub,
    TestCase,
    TestFile,
    TestStep,
    UserStep,
    relative,
)
from recipe.yamlio import line_of, load_yaml, plain

log = logging.getLogger("recipe")

ASSERTION_KINDS = {
    "flow_started",
    "flow_completed",
    "flow_cancelled",
    "pattern_clarification_contains",
    "slot_was_set",
    "slot_was_not_set",
    "action_executed",
    "bot_uttered",
    "bot_did_not_utter",
    "generative_response_is_relevant",
    "generative_response_is_grounded",
}
_USER_STEP_KEYS = {"user", "commands", "assertions", "metadata", "assertion_order_enabled"}


def split_spec(spec: str) -> tuple[Path, str | None]:
    """`path::test name` -> (path, name); a plain path -> (path, None)."""
    path, separator, name = spec.partition("::")
    return Path(path), (name if separator else None)


def _test_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p for p in path.rglob("*") if p.suffix in (".yml", ".yaml") and p.name not in ("conftest.yml", "conftest.yaml")
    )


def load_tests(specs: list[str], project: Project) -> list[TestFile]:
    """Read every test file named by `specs`, then report every mistake in them at once (`InputErrors`).

    A folder without tests, an unknown test name, or a named file without test cases is an error; inside a
    folder, a file whose test cases are all commented out (or that is empty) is skipped with a warning."""
    problems = Problems()
    files: list[TestFile] = []
    for spec in specs:
        path, wanted = split_spec(spec)
        if not path.exists() and not path.is_absolute() and (project.root / path).exists():
            path = project.root / path  # a path given relative to --project
        if not path.exists():
            problems.add(InputError(str(path), None, "test path not found; expected a test file or folder"))
            continue
        found_in_spec = 0
        errors_before = len(problems.errors)
        for file_path in _test_files(path):
            shown = relative(file_path)
            try:
                data = load_yaml(file_path)
            except InputError as error:  # broken YAML
                problems.add(error)
                continue
            named = path.is_file()
            if isinstance(data, dict) and "test_cases" in data and data["test_cases"] in (None, []):
                if named:
                    problems.add(
                        InputError(
                            shown,
                            line_of(data, "test_cases"),
                            "the file has no test cases (all "
                            "commented out?); expected at least one under `test_cases:`",
                        )
                    )
                else:
                    log.warning("%s: no test cases (all commented out?); skipped", shown)
                continue
            if not isinstance(data, dict) or "test_cases" not in data:
                if named:
                    problems.add(InputError(shown, 1, "not a test file; expected a top-level `test_cases:`"))
                elif data is None:
                    log.warning("%s: empty file; skipped", shown)
                continue
            with problems.catch():
                test_file = _read_test_file(file_path, data, project, wanted, problems)
                files.append(test_file)
                found_in_spec += len(test_file.test_cases)
        if found_in_spec == 0 and len(problems.errors) == errors_before:
            problems.add(
                InputError(str(path), None, "no test cases found; expected YAML files with a top-level `test_cases:`")
            )
    problems.raise_if_any()
    return files


def all_test_cases(files: list[TestFile]) -> list[TestCase]:
    return [case for test_file in files for case in test_file.test_cases]


# ---------------------------------------------------------------------------------------------- fixtures, stubs


def _read_named_list(node: Any, key: str, path: str) -> dict[str, Any]:
    """`fixtures:`/`metadata:` are lists of single-key mappings: [{name: value}, ...]."""
    entries = node.get(key) if isinstance(node, dict) else None
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise InputError(path, line_of(node, key), f"`{key}` must be a list of {{name: ...}} entries")
    named: dict[str, Any] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise InputError(path, line_of(entries, index), f"each `{key}` entry must be a single {{name: ...}}")
        ((name, value),) = entry.items()
        named[str(name)] = (value, line_of(entries, index))
    return named


def _fixture_slots(value: Any, path: str, line: int | None, name: str, project: Project) -> list[tuple[str, Any]]:
    """A fixture's slot presets, checked where the fixture is defined: known slots, values their type can hold."""
    if not isinstance(value, list):
        raise InputError(path, line, f"fixture `{name}` must be a list of {{slot: value}}")
    slots = []
    for index, entry in enumerate(value):
        where = line_of(value, index) or line
        if not isinstance(entry, dict):
            raise InputError(path, where, f"fixture `{name}`: each entry must be {{slot: value}}")
        for slot_name, slot_value in entry.items():
            slot_name, slot_value = str(slot_name), plain(slot_value)
            slot = project.slot(slot_name)
            if slot_name != "mocked_datetime" and slot is None:
                raise InputError(path, where, f"fixture `{name}` sets unknown slot `{slot_name}`")
            if slot is not None and slot_value is not None and canonical_slot_value(slot, str(slot_value)) is None:
                raise InputError(
                    path, where, f"fixture `{name}` sets `{slot_name}` to `{slot_value}`, not a valid {slot.type} value"
                )
            slots.append((slot_name, slot_value))
    return slots


def _conftest_fixtures(test_path: Path, project: Project) -> dict[str, tuple[list[tuple[str, Any]], str]]:
    """Fixtures from conftest files, farthest folder first so that the nearest wins.

    The search goes up to the project root; for tests outside the project (such as the split suites prepare-data
    writes, which carry their conftest files with them) it goes up to the file system root.
    """
    folders = []
    folder = test_path.resolve().parent
    root = project.root.resolve()
    while True:
        folders.append(folder)
        if folder == root or folder.parent == folder:
            break
        folder = folder.parent
    fixtures: dict[str, tuple[list[tuple[str, Any]], str]] = {}
    for folder in reversed(folders):
        for name in ("conftest.yml", "conftest.yaml"):
            conftest = folder / name
            if conftest.is_file():
                shown = relative(conftest)
                data = load_yaml(conftest)
                for fixture, (value, line) in _read_named_list(data, "fixtures", shown).items():
                    fixtures[fixture] = (_fixture_slots(value, shown, line, fixture, project), shown)
    return fixtures


def _known_actions(project: Project) -> set[str]:
    return project.domain.actions | {
        step.action for flow in project.flows.values() for step in flow.steps.values() if step.action
    }


def _read_stubs(data: Any, path: str, project: Project) -> dict[str, Stub]:
    """Stubbed custom actions; a stub for an action nothing runs is a typo that would silently change the replay."""
    node = data.get("stub_custom_actions")
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise InputError(path, line_of(data, "stub_custom_actions"), "`stub_custom_actions` must be a mapping")
    stubs = {}
    for action, body in node.items():
        line = line_of(node, action)
        if not isinstance(body, dict):
            raise InputError(path, line, f"stub `{action}` must be a mapping with `events` and/or `responses`")
        action_name = str(action).rpartition("::")[2]
        known = _known_actions(project)
        if action_name not in known:
            hint = difflib.get_close_matches(action_name, sorted(known), n=1)
            raise InputError(
                path,
                line,
                f"stub for `{action_name}`, an action no flow runs and the domain does not "
                f"list{f' (did you mean `{hint[0]}`?)' if hint else ''}",
            )
        events = []
        for event in body.get("events") or []:
            if not isinstance(event, dict) or event.get("event") != "slot" or "name" not in event:
                # Only slot events change what the command generator sees; others are kept out with a note.
                log.debug(
                    "%s:%s: stub event %r ignored (only slot events change the dialogue state)", path, line, event
                )
                continue
            if project.slot(str(event["name"])) is None:
                raise InputError(path, line, f"stub `{action}` sets unknown slot `{event['name']}`")
            events.append((str(event["name"]), plain(event.get("value"))))
        responses = tuple(
            str(response.get("text"))
            for response in body.get("responses") or []
            if isinstance(response, dict) and response.get("text")
        )
        stubs[str(action)] = Stub(events=tuple(events), responses=responses)
    return stubs


# ---------------------------------------------------------------------------------------------- steps


def _read_commands(
    node: Any, step: Any, path: str, project: Project, problems: Problems
) -> tuple[list[Command], Syntax | None]:
    """The commands of one turn, each line checked on its own (every bad line is reported). A test lists what
    every command source produced, so commands on slots the LLM does not fill and values the assistant will
    reject are valid here (see `command_problem`)."""
    if not isinstance(node, list):
        raise InputError(path, line_of(step, "commands"), "`commands` must be a list of command lines")
    commands: list[Command] = []
    syntaxes = set()
    for index, item in enumerate(node):
        line = line_of(node, index) or line_of(step, "commands")
        with problems.catch():
            text = str(item) if not isinstance(item, dict) else None
            if text is None:
                raise InputError(path, line, "each command must be one line of text, e.g. `start flow book_hotel`")
            try:
                command = parse_command(text, custom=project.custom_commands)
            except CommandParseError as error:
                raise InputError(path, line, f"{error}") from None
            problem = command_problem(command, project, from_any_source=True)
            if problem:
                raise InputError(path, line, f"command `{text}`: {problem}")
            command = canonical_command(command, project)
            if command in commands:
                raise InputError(path, line, f"command `{text}` is listed twice for this turn; expected each once")
            commands.append(command)
            syntax = detect_syntax(text)
            if syntax is not None:
                syntaxes.add(syntax)
    return commands, (syntaxes.pop() if len(syntaxes) == 1 else None)


def nlu_commands(commands: list[Command], project: Project) -> list[Command]:
    """The commands only the NLU path produces: set slot on a slot without a `from_llm` mapping (the LLM command
    generator's own output drops them)."""
    found: list[Command] = []
    for command in commands:
        if isinstance(command, SetSlot):
            slot = project.slot(command.slot)
            if slot is not None and not slot.llm_fillable:
                found.append(command)
    return found


_FLOW_LIST_SHAPE = "{operator: any|all, flow_ids: [...]}"


def _check_assertion(kind: str, data: Any, path: str, line: int | None, project: Project) -> None:
    if kind in ("flow_started", "pattern_clarification_contains") and not (
        isinstance(data, (str, list)) or (isinstance(data, dict) and isinstance(data.get("flow_ids"), list))
    ):
        raise InputError(path, line, f"assertion `{kind}` must be {_FLOW_LIST_SHAPE}")
    if kind in ("flow_completed", "flow_cancelled") and not (
        isinstance(data, str) or (isinstance(data, dict) and data.get("flow_id"))
    ):
        raise InputError(path, line, f"assertion `{kind}` must be {{flow_id: ..., flow_step_id: optional}}")
    if kind in ("slot_was_set", "slot_was_not_set") and not (
        isinstance(data, list) and data and all(isinstance(entry, dict) and "name" in entry for entry in data)
    ):
        raise InputError(path, line, f"assertion `{kind}` must be a list of {{name: slot, value: optional}}")
    flow_ids: list[str] = []
    if kind in ("flow_started", "pattern_clarification_contains"):
        if isinstance(data, str):
            flow_ids = [data]
        elif isinstance(data, list):
            flow_ids = [str(item) for item in data]
        elif isinstance(data, dict):
            flow_ids = [str(item) for item in data.get("flow_ids") or []]
    elif kind in ("flow_completed", "flow_cancelled"):
        flow_ids = [str(data.get("flow_id"))] if isinstance(data, dict) else [str(data)]
    names = flow_ids_by_name(project) if kind == "pattern_clarification_contains" else {}
    for flow_id in flow_ids:
        if flow_id in names:
            continue
        if not project.is_known_flow(flow_id):
            raise InputError(path, line, f"assertion `{kind}` names unknown flow `{flow_id}`")
    if kind in ("slot_was_set", "slot_was_not_set"):
        entries = data if isinstance(data, list) else [data]
        for entry in entries:
            name = entry.get("name") if isinstance(entry, dict) else entry
            if project.slot(str(name)) is None:
                raise InputError(path, line, f"assertion `{kind}` names unknown slot `{name}`")


def flow_ids_by_name(project: Project) -> dict[str, str]:
    """User flows by their `name:` (what the user is shown); a flow without one is named by its id."""
    return {flow.name or flow.id: flow.id for flow in project.user_flows}


def _clarified_ids(data: Any, project: Project) -> Any:
    """A clarification assertion with flow ids: the bare-list form lists the flows' names (what the user sees,
    which the runtime compares with the clarification's names); ids are accepted too."""
    by_name = flow_ids_by_name(project)

    def as_id(item: Any) -> str:
        return str(item) if str(item) in project.flows else by_name.get(str(item), str(item))

    if isinstance(data, dict):
        return {**data, "flow_ids": [as_id(item) for item in data.get("flow_ids") or []]}
    if isinstance(data, list):
        return [as_id(item) for item in data]
    return as_id(data)


def _read_assertions(node: Any, path: str, line: int | None, project: Project, problems: Problems) -> list[Assertion]:
    if not isinstance(node, list):
        raise InputError(path, line, "`assertions` must be a list of {assertion: ...} entries")
    assertions = []
    for index, item in enumerate(node):
        line = line_of(node, index)
        with problems.catch():
            if not isinstance(item, dict) or len(item) != 1:
                raise InputError(path, line, "each assertion must be a single {kind: ...} mapping")
            ((kind, data),) = item.items()
            if kind not in ASSERTION_KINDS:
                log.warning("%s:%s: unknown assertion `%s` ignored", path, line, kind)
                continue
            _check_assertion(str(kind), data, path, line, project)
            data = plain(data)
            if kind == "pattern_clarification_contains":
                data = _clarified_ids(data, project)
            assertions.append(Assertion(kind=str(kind), data=data, location=Location(path, line)))
    return assertions


def _slot_checks(node: Any, was_set: bool, path: str, line: int | None, project: Project) -> SlotCheckStep:
    entries = node if isinstance(node, list) else [node]
    slots: list[tuple[str, Any]] = []
    for entry in entries:
        if isinstance(entry, dict):
            slots.extend((str(name), plain(value)) for name, value in entry.items())
        else:
            slots.append((str(entry), NO_VALUE))
    for name, _ in slots:
        if project.slot(name) is None:
            kind = "slot_was_set" if was_set else "slot_was_not_set"
            raise InputError(path, line, f"`{kind}` names unknown slot `{name}`")
    return SlotCheckStep(location=Location(path, line), was_set=was_set, slots=slots)


def _check_payload(text: str, path: str, line: int | None, project: Project) -> None:
    """A `/SetSlots(...)` button payload must name domain slots."""
    for name, _value in parse_set_slots_payload(text) or []:
        slot = project.slot(name)
        if slot is None:
            raise InputError(path, line, f"button payload sets unknown slot `{name}`")
        # A value the slot cannot hold is valid input: the runtime sets it, then its slot rejection resets it.


def _read_step(step: Any, steps: Any, index: int, path: str, project: Project, problems: Problems) -> TestStep:
    line = line_of(steps, index)
    if not isinstance(step, dict):
        raise InputError(path, line, "a test step must be a mapping like `- user: ...`")
    if "user" in step:
        unknown = [key for key in step if key not in _USER_STEP_KEYS]
        if unknown:
            raise InputError(
                path,
                line,
                f"user step has unknown key `{unknown[0]}`; expected one of " + ", ".join(sorted(_USER_STEP_KEYS)),
            )
        text = step["user"]
        if text is None or (isinstance(text, str) and not text.strip()):
            raise InputError(path, line, "user step has no text; expected `user: <message>`")
        if isinstance(text, (dict, list)):
            raise InputError(
                path,
                line,
                "user step text is a list or mapping; expected `user: <message>` (quote "
                "text that contains `: ` or starts with `[` or `{`)",
            )
        user = UserStep(text=str(text), location=Location(path, line), metadata=step.get("metadata"))
        with problems.catch():
            _check_payload(user.text, path, line, project)
        if "commands" in step:
            user.commands, user.syntax = _read_commands(step["commands"], step, path, project, problems)
            user.nlu_commands = nlu_commands(user.commands, project)
        if "assertions" in step:
            user.assertions = _read_assertions(
                step["assertions"], path, line_of(step, "assertions") or line, project, problems
            )
        return user
    for key, what in (("bot", "the bot's text"), ("utter", "a response name")):
        if key in step and (step[key] is None or isinstance(step[key], (dict, list))):
            raise InputError(path, line, f"`{key}` step needs {what}; expected `{key}: <{what}>`")
    if "bot" in step:
        return BotStep(location=Location(path, line), text=str(step["bot"]))
    if "utter" in step:
        return BotStep(location=Location(path, line), utter=str(step["utter"]))
    if "slot_was_set" in step:
        return _slot_checks(step["slot_was_set"], True, path, line, project)
    if "slot_was_not_set" in step:
        return _slot_checks(step["slot_was_not_set"], False, path, line, project)
    found = ", ".join(str(key) for key in step) or "nothing"
    raise InputError(
        path, line, f"unknown test step `{found}`; expected one of user, bot, utter, slot_was_set, slot_was_not_set"
    )


def _read_test_file(file_path: Path, data: Any, project: Project, wanted: str | None, problems: Problems) -> TestFile:
    """Read one test file; with `wanted`, only that test case (an unknown name is an error). A test case with a
    mistake is reported in `problems` and left out; the others are read on."""
    path = relative(file_path)
    cases_node = data.get("test_cases")
    if not isinstance(cases_node, list):
        raise InputError(path, line_of(data, "test_cases"), "`test_cases` must be a list of test cases")
    fixtures = _conftest_fixtures(file_path, project)
    for name, (value, line) in _read_named_list(data, "fixtures", path).items():
        fixtures[name] = ([], path)  # a fixture with a mistake is reported once, not again where it is used
        with problems.catch():
            fixtures[name] = (_fixture_slots(value, path, line, name, project), path)
    metadata = {name: plain(value) for name, (value, _) in _read_named_list(data, "metadata", path).items()}
    stubs: dict[str, Stub] = {}
    with problems.catch():
        stubs = _read_stubs(data, path, project)
    test_cases: list[TestCase] = []
    names: dict[str, int] = {}
    for index, node in enumerate(cases_node):
        line = line_of(cases_node, index)
        if not isinstance(node, dict) or not node.get("test_case"):
            problems.add(InputError(path, line, "each test case needs a `test_case: <name>`"))
            continue
        name = str(node["test_case"])
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            # Rasa runs both; so do we, the second as `name#2` (warned: their results are hard to tell apart).
            log.warning(
                "%s:%s: test case name `%s` is used again in this file; both are kept (this one as `%s#%d`)",
                path,
                line,
                name,
                name,
                names[name],
            )
        if wanted is not None and name != wanted:
            continue
        with problems.catch():
            test_cases.append(
                _read_test_case(
                    node, name, names[name], index, file_path, path, fixtures, metadata, stubs, project, problems
                )
            )
    for key in stubs:
        case_name, separator, _ = key.partition("::")
        if separator and case_name not in names:
            node = data.get("stub_custom_actions")
            problems.add(
                InputError(
                    path,
                    line_of(node, key),
                    f"stub `{key}` names test case `{case_name}`, which this file does not have",
                )
            )
    if wanted is not None and wanted not in names:
        listed = ", ".join(f"`{name}`" for name in sorted(names))
        raise InputError(path, line_of(data, "test_cases"), f"no test case named `{wanted}`; the file has {listed}")
    return TestFile(path=path, test_cases=test_cases, raw=plain(data))


def _read_test_case(
    node: Any,
    name: str,
    occurrence: int,
    index: int,
    file_path: Path,
    path: str,
    fixtures: dict[str, tuple[list[tuple[str, Any]], str]],
    metadata: dict[str, Any],
    stubs: dict[str, Stub],
    project: Project,
    problems: Problems,
) -> TestCase:
    cases_line = line_of(node) or None
    steps_node = node.get("steps")
    if not isinstance(steps_node, list) or not steps_node:
        raise InputError(path, cases_line, f"test case `{name}` needs a non-empty `steps` list")
    fixture_slots: list[tuple[str, Any]] = []
    if node.get("fixtures") is not None and not isinstance(node["fixtures"], list):
        raise InputError(path, line_of(node, "fixtures"), "`fixtures` must be a list of fixture names")
    for position, fixture in enumerate(node.get("fixtures") or []):
        if str(fixture) not in fixtures:
            where = line_of(node["fixtures"], position) or line_of(node, "fixtures")
            problems.add(
                InputError(
                    path,
                    where,
                    f"unknown fixture `{fixture}`; define it under `fixtures:` in this file or a conftest.yml",
                )
            )
            continue
        fixture_slots.extend(fixtures[str(fixture)][0])
    meta_name = node.get("metadata")
    if meta_name is not None and str(meta_name) not in metadata:
        problems.add(InputError(path, line_of(node, "metadata"), f"unknown metadata `{meta_name}`"))
    case_stubs = {action: stub for action, stub in stubs.items() if "::" not in action}
    for key, stub in stubs.items():
        case_name, separator, action = key.partition("::")
        if separator and case_name == name:
            case_stubs[action] = stub
    steps: list[TestStep] = []
    for i, step in enumerate(steps_node):
        with problems.catch():
            steps.append(_read_step(step, steps_node, i, path, project, problems))
    return TestCase(
        name=name,
        file=path,
        location=Location(path, cases_line),
        steps=steps,
        fixture_slots=fixture_slots,
        metadata=metadata.get(str(meta_name), {}) if meta_name is not None else {},
        stubs=case_stubs,
        project_file=relative(file_path, project.root),
        index=index,
        occurrence=occurrence,
    )


# ---------------------------------------------------------------------------------------------- annotated files


def load_annotated_conversations(path: Path, project: Project) -> list[dict[str, Any]]:
    """Read prepare-data's `conversations:` records (1_command_annotations/, 2_rephrasings/); commands parsed and checked like in test files."""
    shown = relative(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise InputError(shown, 1, "expected a top-level `conversations:` list")
    conversations = []
    for index, node in enumerate(data["conversations"]):
        line = line_of(data["conversations"], index)
        if not isinstance(node, dict) or "original_test_case" not in node or "steps" not in node:
            raise InputError(shown, line, "each conversation needs `original_test_case` and `steps`")
        steps = []
        for step_index, step in enumerate(node["steps"] or []):
            step_line = line_of(node["steps"], step_index)
            if not isinstance(step, dict):
                raise InputError(shown, step_line, "each step must be a mapping")
            entry: dict[str, Any] = {key: plain(value) for key, value in step.items()}
            if "llm_commands" in step:
                problems = Problems()
                entry["llm_commands"], _ = _read_commands(step["llm_commands"], step, shown, project, problems)
                problems.raise_if_any()
            passing = step.get("passing_rephrasings")
            failing = step.get("failing_rephrasings", step.get("failed_rephrasings"))
            entry["passing_rephrasings"] = [str(text) for text in passing or []]
            entry["failing_rephrasings"] = [str(text) for text in failing or []]
            entry.pop("failed_rephrasings", None)
            steps.append(entry)
        conversations.append({"original_test_case": str(node["original_test_case"]), "steps": steps})
    return conversations
