"""`recipe coverage` on the bundled example, checked against counts taken straight from the test YAML.

The expected numbers are computed here from the files with a plain YAML loader and a small keyword table written
from the dialect table in rasa-formats §5.1, independent of `recipe.commands`.
"""

from __future__ import annotations

import io
import json
import re
import textwrap
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from recipe.cli import main
from recipe.commands import CORE_COMMAND_KINDS
from recipe.coverage import DERIVABLE, NOT_DERIVABLE, coverage_report, summary_lines
from recipe.project import load_project
from recipe.testcases import load_tests

ROOT = Path(__file__).resolve().parent.parent

# Command kind by the v1 name or the first word(s) of the word dialects (rasa-formats §5.1).
V1_KINDS = {
    "StartFlow": "start flow",
    "SetSlot": "set slot",
    "CancelFlow": "cancel flow",
    "Clarify": "clarify",
    "ChitChat": "chitchat",
    "SearchAndReply": "knowledge",
    "SkipQuestion": "skip question",
    "RepeatLastBotMessages": "repeat",
    "HumanHandoff": "human handoff",
    "CannotHandle": "cannot handle",
}
WORD_KINDS = {
    "start": "start flow",
    "set": "set slot",
    "cancel": "cancel flow",
    "disambiguate": "clarify",
    "clarify": "clarify",
    "offtopic": "chitchat",
    "chat": "chitchat",
    "provide": "knowledge",
    "search": "knowledge",
    "skip": "skip question",
    "repeat": "repeat",
    "hand": "human handoff",
    "cannot": "cannot handle",
}
SHORT_FORMS = re.compile(r"^(start (?!flow )\S+|set (?!slot )\S+.*|cancel|clarify( .*)?|chat|search|skip)$")


def kind_of(line: str) -> str:
    v1 = re.match(r"^([A-Za-z]+)\(", line)
    return V1_KINDS[v1.group(1)] if v1 else WORD_KINDS[line.split()[0]]


def dialect_of(line: str) -> str:
    if re.match(r"^[A-Za-z]+\(", line):
        return "v1"
    if SHORT_FORMS.match(line):
        return "short"
    return "v3" if line == "search and reply" else "v2"


def user_steps(path: Path) -> Iterator[dict[str, Any]]:
    data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "test_cases" in data:
        for case in data["test_cases"]:
            yield from (step for step in case["steps"] if "user" in step)


def is_payload(text: str) -> bool:
    return str(text).startswith("/")


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    """Counts straight from e2e_tests/**/*.yml."""
    kinds: Counter[str] = Counter()
    slot_sets: Counter[str] = Counter()
    payload_sets: Counter[str] = Counter()
    dialects: dict[str, Counter[str]] = {}
    all_lines: Counter[str] = Counter()
    turns = payloads = without = 0
    for path in sorted((ROOT / "e2e_tests").rglob("*.yml")):
        for step in user_steps(path):
            turns += 1
            lines = [str(line) for line in step.get("commands") or []]
            dialects.setdefault(str(path.relative_to(ROOT)), Counter()).update(dialect_of(line) for line in lines)
            if is_payload(step["user"]):
                payloads += 1
                payload_sets.update(re.findall(r"(\w+)=", step["user"]))
                continue
            without += not lines
            kinds.update(kind_of(line) for line in lines)
            all_lines.update(lines)
            for line in lines:
                match = re.match(r"^(?:SetSlot\(\s*|set slot |set )(\w+)", line)
                if match:
                    slot_sets[match.group(1)] += 1
    return {
        "kinds": kinds,
        "lines": all_lines,
        "slot_sets": slot_sets,
        "payload_sets": payload_sets,
        "turns": turns,
        "payloads": payloads,
        "without": without,
        "dialects": {path: dict(counts) for path, counts in dialects.items() if counts},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("coverage")
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(["coverage", "-o", str(out)])
    return code, stdout.getvalue(), out


@pytest.fixture(scope="module")
def report(run) -> dict[str, Any]:
    return json.loads((run[2] / "coverage.json").read_text(encoding="utf-8"))


def test_exits_zero_and_writes_markdown_json_and_charts(run):
    code, _, out = run
    assert code == 0
    assert "## Command types" in (out / "coverage.md").read_text(encoding="utf-8")
    for chart in ("command_types.png", "flow_starts.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({chart})" in (out / "coverage.md").read_text(encoding="utf-8")


def test_written_command_counts_equal_the_yaml(report, expected):
    written = {row["kind"]: row["written"] for row in report["command_types"]}
    assert list(written) == list(CORE_COMMAND_KINDS)  # every core kind, zeros included, in a stable order
    assert written == {kind: expected["kinds"][kind] for kind in CORE_COMMAND_KINDS}
    assert sum(written.values()) > 200  # the example really has commands in every dialect


def test_derived_counts_are_the_commands_listed_for_turns_without_commands(report):
    derived: Counter[str] = Counter()
    for turn in report["turns_without_commands"]:
        assert turn["status"] == DERIVABLE or turn["reason"]
        derived.update(kind_of(line) for line in turn["commands"])
    assert {row["kind"]: row["derived"] for row in report["command_types"]} == {
        kind: derived[kind] for kind in CORE_COMMAND_KINDS
    }
    assert all(row["total"] == row["written"] + row["derived"] for row in report["command_types"])
    assert report["command_counts"] == {row["kind"]: row["total"] for row in report["command_types"]}


def test_turn_counts_equal_the_yaml(report, expected):
    assert report["user_turns"] == expected["turns"]
    assert len(report["payload_turns"]) == expected["payloads"]
    assert len(report["turns_without_commands"]) == expected["without"]
    assert all(turn["text"].startswith("/SetSlots(") for turn in report["payload_turns"])


def test_flow_and_slot_counts_add_written_and_derived(report, expected):
    derived_lines = [line for turn in report["turns_without_commands"] for line in turn["commands"]]
    for flow in report["flows"]:
        spellings = (f"start flow {flow['flow']}", f"StartFlow({flow['flow']})", f"start {flow['flow']}")
        written = sum(expected["lines"][spelling] for spelling in spellings)
        assert flow["start_commands"] == written + derived_lines.count(f"start flow {flow['flow']}")
    for slot in report["slots"]:
        derived = sum(line.startswith(f"set slot {slot['slot']} ") for line in derived_lines)
        assert slot["set_commands"] == expected["slot_sets"][slot["slot"]] + derived
        assert slot["payload_sets"] == expected["payload_sets"][slot["slot"]]


def test_dialects_per_file_equal_the_yaml(report, expected):
    assert {path: counts for path, counts in report["dialects"].items() if counts} == expected["dialects"]
    assert {"v1", "v2", "short"} <= {d for counts in expected["dialects"].values() for d in counts}


def test_terminal_shows_every_command_type_with_its_count(run, report):
    from recipe.commands import Syntax
    from recipe.coverage import command_label

    stdout = run[1]
    assert "commands shown in v2" in stdout
    for row in report["command_types"]:
        label = command_label(row["kind"], Syntax.V2)  # the table says v2, so it shows v2's words
        pattern = rf"^{re.escape(label)} +{row['written']} +{row['derived']} +{row['total']}$"
        assert re.search(pattern, stdout, re.MULTILINE), row["kind"]
    for internal, v2 in (
        ("knowledge", "provide info"),
        ("clarify", "disambiguate flows"),
        ("chitchat", "offtopic reply"),
    ):
        assert not re.search(rf"^{internal} ", stdout, re.MULTILINE) and re.search(rf"^{v2} ", stdout, re.MULTILINE)
    unused = [row["kind"] for row in report["command_types"] if row["total"] == 0]
    shown = ", ".join(command_label(kind, Syntax.V2) for kind in unused)
    assert f"command types never used: {shown or 'none'}" in stdout
    assert report["gaps"]["unused_command_types"] == unused


def test_tracker_warnings_are_summarised_by_action(run, report):
    stdout = run[1]
    by_action = report["tracker_warnings"]["custom actions without a stub"]
    assert by_action and all(count >= 1 for count in by_action.values())
    (line,) = [line for line in stdout.splitlines() if "custom actions without a stub" in line]
    for action, count in by_action.items():
        assert line.count(f"{action} ×{count}") == 1
    assert "has no stub" not in stdout  # never one line per turn


# ---------------------------------------------------------------------------------------------- gaps


def write_project(root: Path) -> None:
    files = {
        "flows/flows.yml": """
            flows:
              order_pizza:
                description: The user wants to order a pizza.
                steps:
                  - collect: pizza_size
                  - collect: address
                  - action: utter_order_done
              check_order:
                description: The user asks where their order is.
                steps:
                  - action: utter_order_status
              reorder:
                description: Order the same as last time.
                if: slots.has_orders
                steps:
                  - action: utter_order_done
              add_note:
                description: Reached from other flows only.
                if: False
                steps:
                  - collect: note
            """,
        "domain.yml": """
            slots:
              pizza_size: {type: categorical, values: [small, large], mappings: [{type: from_llm}]}
              address: {type: text, mappings: [{type: from_llm}]}
              note: {type: text, mappings: [{type: from_llm}]}
              has_orders: {type: bool, mappings: [{type: controlled}]}
            responses:
              utter_ask_pizza_size:
                - text: Which size?
                  buttons: [{title: Large, payload: "/SetSlots(pizza_size=large)"}]
              utter_ask_address: [{text: Where to?}]
              utter_order_done: [{text: Done.}]
              utter_order_status: [{text: Soon.}]
            """,
        "e2e_tests/orders.yml": """
            test_cases:
              - test_case: pizza with a button and an unknown address
                steps:
                  - user: I want a pizza
                    commands: [start flow order_pizza]
                  - utter: utter_ask_pizza_size
                  - user: /SetSlots(pizza_size=large)
                  - utter: utter_ask_address
                  - user: deliver it to my office
                    assertions:
                      - slot_was_set:
                          - name: address
                  - user: thanks
                    commands: []
              - test_case: reorder without earlier orders
                steps:
                  - user: same as last time
                    commands: [start flow reorder]
            """,
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


def test_gaps_are_listed(tmp_path, monkeypatch):
    write_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    project = load_project(".")
    report = coverage_report(project, load_tests(["e2e_tests"], project))
    assert report.flows_never_started == ["check_order"]  # add_note is `if: False`: not a gap
    # pizza_size only ever came from a button; address only from an assertion without a value.
    assert report.slots_never_set == ["pizza_size", "address", "note"]
    assert [s.payload_sets for s in report.slots] == [1, 0, 0]
    assert [(t.turn, t.status) for t in report.turns_without_commands] == [(3, NOT_DERIVABLE), (4, "empty in test")]
    assert "address" in (report.turns_without_commands[0].reason or "")
    assert [t.text for t in report.payload_turns] == ["/SetSlots(pizza_size=large)"]
    lines = summary_lines(report)
    assert "  user flows never started by a command: check_order" in lines
    assert "  collected slots never set by a command: pizza_size, address, note" in lines
    assert any(line.startswith("  e2e_tests/orders.yml:9: turn 3 has no commands") for line in lines)
    # The test labels a start the runtime would drop: summarised per flow, not per turn.
    assert report.tracker_warnings["start flow while the flow's guard is false"] == {"reorder": 1}
    assert "tracker warnings, start flow while the flow's guard is false: reorder ×1" in lines
