"""`recipe coverage`: what an assistant's tests would teach a command generator, and what they leave out.

Run before any paid or slow work. For every user turn we know its commands from one of three places: written in
the test (`commands:`), derived offline from the test's assertions (`recipe.annotate.annotate_from_assertions`), or
none at all (a button payload never reaches the command generator). From that we count command types, `start flow`
per user flow and `set slot` per collected slot, and list the gaps a finetuned model would inherit: command types
it never sees, flows it never learns to start, slots it never learns to fill, turns that give no label.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipe.annotate import TestAnnotation, annotate_from_assertions
from recipe.commands import (
    COMMAND_KINDS,
    CORE_COMMAND_KINDS,
    Command,
    SetSlot,
    StartFlow,
    Syntax,
    detect_syntax,
    format_command,
    version_kinds,
)
from recipe.conversation import replay_test_case
from recipe.project import Project
from recipe.prompt import choose_syntax
from recipe.tracker import is_button_payload, parse_set_slots_payload
from recipe.types import Flow, TestCase, TestFile, UserStep
from recipe.yamlio import write_atomic, write_json

# Tracker warnings are per turn; the report groups them by what they are about (the captured name).
WARNING_GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("custom actions without a stub", re.compile(r"custom action `([^`]+)` has no stub")),
    ("responses not in the domain", re.compile(r"response `([^`]+)` is not in the domain")),
    ("expected responses the flows would not say", re.compile(r"the test expects `([^`]+)` after turn")),
    ("start flow while the flow's guard is false", re.compile(r"flow `([^`]+)` cannot be started now")),
)
OTHER_WARNINGS = "other"
MAX_TURNS_LISTED = 10  # in the terminal; coverage.md lists them all

# Turn statuses for turns whose test gives no commands.
DERIVABLE = "derivable from assertions"
NOT_DERIVABLE = "not derivable"
EMPTY_IN_TEST = "empty in test"


@dataclass(frozen=True)
class CommandTypeCount:
    kind: str
    written: int  # in the tests' `commands:` lists
    derived: int  # derived from assertions for turns without `commands:`

    @property
    def total(self) -> int:
        return self.written + self.derived


@dataclass(frozen=True)
class FlowCoverage:
    flow: str
    start_commands: int  # `start flow <flow>` written or derived
    replay_starts: int  # times the replay started it: commands, links, calls, payload intents
    startable_by_command: bool  # False for `if: False` flows, which only a link or call reaches


@dataclass(frozen=True)
class SlotCoverage:
    slot: str
    flows: tuple[str, ...]  # user flows that collect it
    set_commands: int  # `set slot <slot> ...` written or derived
    payload_sets: int  # `/SetSlots(<slot>=...)` button payloads: set, but never by the command generator
    llm_fillable: bool
    nlu_sets: int = 0  # set in turns the NLU path answered (a slot without a from_llm mapping): not LLM rows


@dataclass(frozen=True)
class TurnWithoutCommands:
    test_case: str
    turn: int  # 1-based among the test case's user turns
    text: str
    location: str
    status: str  # DERIVABLE | NOT_DERIVABLE | EMPTY_IN_TEST
    commands: tuple[str, ...] = ()  # derived commands, in the report's syntax
    reason: str | None = None


@dataclass(frozen=True)
class PayloadTurn:
    test_case: str
    turn: int
    text: str
    location: str


@dataclass(frozen=True)
class NluTurn:
    """A turn whose commands set slots the LLM command generator does not fill: the NLU path answered it."""

    test_case: str
    turn: int
    text: str
    location: str
    commands: tuple[str, ...]


@dataclass
class CoverageReport:
    syntax: Syntax  # the dialect derived commands are shown in (what training data would use)
    syntax_source: str
    generator: str | None  # the command generator config.yml names, if any
    test_files: list[str]
    test_cases: int
    user_turns: int
    command_types: list[CommandTypeCount]
    flows: list[FlowCoverage]
    slots: list[SlotCoverage]
    turns_without_commands: list[TurnWithoutCommands]
    payload_turns: list[PayloadTurn]
    dialects: dict[str, dict[str, int]]  # test file -> dialect -> command lines
    nlu_turns: list[NluTurn] = field(default_factory=list)
    tracker_warnings: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> subject -> count
    # Turns after which the replayed state contradicts the test's own bot turns or assertions (their next turn's
    # prompt would be built from a wrong state), and what the replay read from the tests' bot turns instead.
    state_disagreements: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    state_inferences: int = 0

    @property
    def unused_command_types(self) -> list[str]:
        return [count.kind for count in self.command_types if count.total == 0]

    @property
    def flows_never_started(self) -> list[str]:
        return [f.flow for f in self.flows if f.startable_by_command and f.start_commands == 0]

    @property
    def slots_never_set(self) -> list[str]:
        return [s.slot for s in self.slots if s.llm_fillable and s.set_commands == 0]

    @property
    def turns_not_derivable(self) -> list[TurnWithoutCommands]:
        return [turn for turn in self.turns_without_commands if turn.status == NOT_DERIVABLE]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["syntax"] = self.syntax.value
        data["command_types"] = [{**asdict(c), "total": c.total} for c in self.command_types]
        data["command_counts"] = {c.kind: c.total for c in self.command_types}
        data["gaps"] = {
            "unused_command_types": self.unused_command_types,
            "flows_never_started": self.flows_never_started,
            "slots_never_set": self.slots_never_set,
            "turns_not_derivable": len(self.turns_not_derivable),
        }
        return data


# ---------------------------------------------------------------------------------------------- building


def _collected_slots(project: Project) -> dict[str, list[str]]:
    """Slot -> the user flows that collect it, in flow order."""
    slots: dict[str, list[str]] = {}
    for flow in project.user_flows:
        for step in flow.collect_steps():
            flows = slots.setdefault(step.collect or "", [])
            if flow.id not in flows:
                flows.append(flow.id)
    return slots


def _startable_by_command(flow: Flow) -> bool:
    return flow.guard is None or flow.guard.strip().lower() != "false"


def _llm_fillable(project: Project, name: str) -> bool:
    slot = project.slot(name)
    return slot is not None and slot.llm_fillable


def _dialects(test_file: TestFile, names: set[str]) -> dict[str, int]:
    """Command lines per dialect, read from the file's own text (the parsed commands no longer know it)."""
    counts: Counter[str] = Counter()
    for case in test_file.raw.get("test_cases") or []:
        if not isinstance(case, dict) or str(case.get("test_case")) not in names:
            continue
        for step in case.get("steps") or []:
            for line in (step.get("commands") or []) if isinstance(step, dict) else []:
                syntax = detect_syntax(str(line))
                counts[syntax.value if syntax else "unknown"] += 1
    return dict(sorted(counts.items()))


def _group_warning(message: str, groups: dict[str, Counter[str]]) -> None:
    for title, pattern in WARNING_GROUPS:
        match = pattern.search(message)
        if match:
            groups.setdefault(title, Counter())[match.group(1)] += 1
            return
    groups.setdefault(OTHER_WARNINGS, Counter())[message] += 1


@dataclass
class _Tally:
    """Running counts while walking the test cases."""

    written: Counter[str] = field(default_factory=Counter)
    derived: Counter[str] = field(default_factory=Counter)
    starts: Counter[str] = field(default_factory=Counter)
    replay_starts: Counter[str] = field(default_factory=Counter)
    slot_sets: Counter[str] = field(default_factory=Counter)
    payload_sets: Counter[str] = field(default_factory=Counter)
    nlu_sets: Counter[str] = field(default_factory=Counter)
    nlu_turns: list[NluTurn] = field(default_factory=list)
    disagreements: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    inferences: int = 0
    user_turns: int = 0
    without_commands: list[TurnWithoutCommands] = field(default_factory=list)
    payloads: list[PayloadTurn] = field(default_factory=list)
    warnings: dict[str, Counter[str]] = field(default_factory=dict)

    def count_commands(self, commands: list[Command], counter: Counter[str]) -> None:
        for command in commands:
            counter[command.kind] += 1
            if isinstance(command, StartFlow):
                self.starts[command.flow] += 1
            elif isinstance(command, SetSlot):
                self.slot_sets[command.slot] += 1


def _tally_test_case(project: Project, test_case: TestCase, syntax: Syntax, tally: _Tally) -> None:
    annotation = annotate_from_assertions(project, test_case)
    for number, step in enumerate(test_case.user_steps, start=1):
        tally.user_turns += 1
        where = str(step.location)
        if is_button_payload(step.text):
            # The runtime applies a payload directly; any commands written for it are never trained on.
            tally.payloads.append(PayloadTurn(test_case.id, number, step.text, where))
            for slot, _ in parse_set_slots_payload(step.text) or []:
                tally.payload_sets[slot] += 1
            continue
        if step.nlu_commands:
            # Counted apart: the turn changes the state, but the LLM command generator never answers it.
            commands = tuple(format_command(command, syntax) for command in step.commands or [])
            tally.nlu_turns.append(NluTurn(test_case.id, number, step.text, where, commands))
            for command in step.nlu_commands:
                if isinstance(command, SetSlot):
                    tally.nlu_sets[command.slot] += 1
            continue
        if step.commands:
            tally.count_commands(step.commands, tally.written)
        elif step.commands is not None:
            tally.without_commands.append(TurnWithoutCommands(test_case.id, number, step.text, where, EMPTY_IN_TEST))
        else:
            tally.without_commands.append(_without_commands(test_case, number, step, annotation, syntax, tally))
    for turn in replay_test_case(project, test_case, annotation.commands_for):
        for flow_id in turn.events.flows_started:
            tally.replay_starts[flow_id] += 1
        for warning in turn.warnings:
            _group_warning(warning, tally.warnings)
        if turn.disagreements:
            tally.disagreements.setdefault(test_case.id, {})[turn.number] = turn.disagreements
        tally.inferences += len(turn.inferences)


def _without_commands(
    test_case: TestCase, number: int, step: UserStep, annotation: TestAnnotation, syntax: Syntax, tally: _Tally
) -> TurnWithoutCommands:
    derived = annotation.turns[number - 1]
    where = str(step.location)
    if derived.commands is None:
        return TurnWithoutCommands(test_case.id, number, step.text, where, NOT_DERIVABLE, reason=derived.reason)
    tally.count_commands(derived.commands, tally.derived)
    labels = tuple(format_command(command, syntax) for command in derived.commands)
    return TurnWithoutCommands(test_case.id, number, step.text, where, DERIVABLE, labels)


def coverage_report(project: Project, test_files: list[TestFile]) -> CoverageReport:
    """Count what the tests in `test_files` teach about `project`'s commands, flows and slots."""
    syntax = choose_syntax(project, None)
    source = f"{project.config.path} ({project.config.generator})" if project.config.generator else "default"
    tally = _Tally()
    cases = [case for test_file in test_files for case in test_file.test_cases]
    for test_case in cases:
        _tally_test_case(project, test_case, syntax, tally)
    # Every core kind of the target Rasa release, zeros included; others (agent commands, `hand over` from 3.16 on)
    # only when the tests use them.
    offered = version_kinds(project.rasa_version)
    kinds = [
        kind
        for kind in COMMAND_KINDS
        if (kind in CORE_COMMAND_KINDS and kind in offered) or tally.written[kind] + tally.derived[kind]
    ]
    return CoverageReport(
        syntax=syntax,
        syntax_source=source,
        generator=project.config.generator,
        test_files=[test_file.path for test_file in test_files],
        test_cases=len(cases),
        user_turns=tally.user_turns,
        command_types=[CommandTypeCount(kind, tally.written[kind], tally.derived[kind]) for kind in kinds],
        flows=[
            FlowCoverage(flow.id, tally.starts[flow.id], tally.replay_starts[flow.id], _startable_by_command(flow))
            for flow in project.user_flows
        ],
        slots=[
            SlotCoverage(
                name,
                tuple(flows),
                tally.slot_sets[name],
                tally.payload_sets[name],
                _llm_fillable(project, name),
                tally.nlu_sets[name],
            )
            for name, flows in _collected_slots(project).items()
        ],
        turns_without_commands=tally.without_commands,
        payload_turns=tally.payloads,
        nlu_turns=tally.nlu_turns,
        state_disagreements=tally.disagreements,
        state_inferences=tally.inferences,
        dialects={
            test_file.path: _dialects(test_file, {case.name for case in test_file.test_cases})
            for test_file in test_files
        },
        tracker_warnings={group: dict(counts.most_common()) for group, counts in tally.warnings.items()},
    )


# ---------------------------------------------------------------------------------------------- terminal


def _aligned(rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    """Rows as lines with columns padded; columns from `numeric_from` on are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(widths[i]) if i >= numeric_from else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


# What each command kind is called in a syntax, where it is not the kind itself: tables that say "v2" show v2's words.
_LABELS: dict[Syntax, dict[str, str]] = {
    Syntax.V1: {
        "start flow": "StartFlow",
        "set slot": "SetSlot",
        "cancel flow": "CancelFlow",
        "clarify": "Clarify",
        "chitchat": "ChitChat",
        "knowledge": "SearchAndReply",
        "skip question": "SkipQuestion",
        "repeat": "RepeatLastBotMessages",
        "human handoff": "HumanHandoff",
        "cannot handle": "CannotHandle",
        "continue agent": "ContinueAgent",
        "restart agent": "RestartAgent",
    },
    Syntax.V2: {
        "clarify": "disambiguate flows",
        "chitchat": "offtopic reply",
        "knowledge": "provide info",
        "repeat": "repeat message",
        "human handoff": "hand over",
    },
}
_LABELS[Syntax.V3] = _LABELS[Syntax.V2] | {"knowledge": "search and reply"}


def command_label(kind: str, syntax: Syntax) -> str:
    """The command's name in `syntax` (`knowledge` is `provide info` in v2, `SearchAndReply` in v1)."""
    return _LABELS.get(syntax, _LABELS[Syntax.V2]).get(kind, kind)


def _labels(kinds: list[str], syntax: Syntax) -> list[str]:
    return [command_label(kind, syntax) for kind in kinds]


def command_table(report: CoverageReport) -> list[str]:
    rows = [["command type", "written", "derived", "total"]]
    rows += [
        [command_label(c.kind, report.syntax), str(c.written), str(c.derived), str(c.total)]
        for c in report.command_types
    ]
    return _aligned(rows)


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in counts.items())


def dialect_line(report: CoverageReport) -> str:
    lines: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for counts in report.dialects.values():
        for dialect, number in counts.items():
            lines[dialect] += number
            files[dialect] += 1
    parts = [
        f"{dialect} {_plural(lines[dialect], 'line')} in {_plural(files[dialect], 'file')}"
        for dialect in sorted(lines, key=lambda d: -lines[d])
    ]
    return f"command dialects: {', '.join(parts) or 'no commands written'}"


def _files_in_other_dialects(report: CoverageReport) -> list[str]:
    """Files Rasa Pro could not load as DU tests: it parses `commands:` only in the configured generator's syntax."""
    if report.generator is None:
        return []
    readable = {Syntax.V2.value, Syntax.V3.value} if report.syntax in (Syntax.V2, Syntax.V3) else {Syntax.V1.value}
    return [path for path, counts in report.dialects.items() if set(counts) - readable]


def summary_lines(report: CoverageReport) -> list[str]:
    """The terminal summary: the command table, then the gaps, one line each."""
    turns = report.turns_without_commands
    derivable = sum(turn.status == DERIVABLE for turn in turns)
    empty = sum(turn.status == EMPTY_IN_TEST for turn in turns)
    lines = [
        f"{_plural(report.test_cases, 'test case')} in {_plural(len(report.test_files), 'file')}, "
        f"{_plural(report.user_turns, 'user turn')}; "
        f"commands shown in {report.syntax.value} ({report.syntax_source})",
        "",
        *command_table(report),
        "",
        f"turns without commands in the test: {len(turns)} ({derivable} derivable from assertions, "
        f"{len(report.turns_not_derivable)} not derivable"
        + (f", {empty} with `commands: []`" if empty else "")
        + f"); button-payload turns: {len(report.payload_turns)}; NLU turns (slots the LLM does not fill): "
        f"{len(report.nlu_turns)}",
        f"state disagreements with the tests' own bot turns and assertions: "
        f"{sum(len(turns) for turns in report.state_disagreements.values())} turn(s) in "
        f"{_plural(len(report.state_disagreements), 'test case')}; read from the tests' bot turns: "
        f"{report.state_inferences}",
        "gaps:",
        f"  command types never used: {', '.join(_labels(report.unused_command_types, report.syntax)) or 'none'}",
        f"  user flows never started by a command: {', '.join(report.flows_never_started) or 'none'}",
        f"  collected slots never set by a command: {', '.join(report.slots_never_set) or 'none'}",
    ]
    not_derivable = report.turns_not_derivable
    for turn in not_derivable[:MAX_TURNS_LISTED]:
        lines.append(
            f"  {turn.location}: turn {turn.turn} has no commands and none follow from its assertions: {turn.reason}"
        )
    if len(not_derivable) > MAX_TURNS_LISTED:
        lines.append(f"  ... and {len(not_derivable) - MAX_TURNS_LISTED} more turns like these (see coverage.md)")
    for path in _files_in_other_dialects(report):
        lines.append(
            f"  {path}: commands in {', '.join(report.dialects[path])}; Rasa Pro's {report.generator} "
            f"reads only {report.syntax.value} in DU tests"
        )
    lines.append(dialect_line(report))
    for group, counts in report.tracker_warnings.items():
        lines.append(f"tracker warnings, {group}: {_counts_text(counts)}")
    return lines


# ---------------------------------------------------------------------------------------------- files


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cell(value) for value in row) + " |" for row in rows),
    ]


def _case_name(test_case_id: str) -> str:
    return test_case_id.partition("::")[2]  # the location column already names the file


def coverage_markdown(report: CoverageReport) -> str:
    slots_note = {True: "", False: " (not fillable by the LLM)"}
    lines = [
        "# Test coverage",
        "",
        f"{_plural(report.test_cases, 'test case')} in {_plural(len(report.test_files), 'file')}, "
        f"{_plural(report.user_turns, 'user turn')}. "
        f"Commands are shown in the {report.syntax.value} syntax ({report.syntax_source}).",
        "",
        "## Command types",
        "",
        "`written`: in the tests' `commands:`; `derived`: from the assertions of turns without `commands:`.",
        "",
        "![command types](command_types.png)",
        "",
        *_md_table(
            ["command type", "written", "derived", "total"],
            [[command_label(c.kind, report.syntax), c.written, c.derived, c.total] for c in report.command_types],
        ),
        "",
        "## User flows",
        "",
        "![start flow per user flow](flow_starts.png)",
        "",
        *_md_table(
            ["flow", "start flow commands", "started in replay", "startable by a command"],
            [
                [f.flow, f.start_commands, f.replay_starts, "yes" if f.startable_by_command else "no (link/call only)"]
                for f in report.flows
            ],
        ),
        "",
        f"Never started by a command: {', '.join(report.flows_never_started) or 'none'}.",
        "",
        "## Collected slots",
        "",
        *_md_table(
            ["slot", "collected by", "set slot commands", "set by button payloads"],
            [
                [s.slot + slots_note[s.llm_fillable], ", ".join(s.flows), s.set_commands, s.payload_sets]
                for s in report.slots
            ],
        ),
        "",
        f"Never set by a command: {', '.join(report.slots_never_set) or 'none'}.",
        "",
        "## Turns without commands",
        "",
        *_md_table(
            ["where", "test case", "turn", "user says", "status", "commands / reason"],
            [
                [t.location, _case_name(t.test_case), t.turn, t.text, t.status, "; ".join(t.commands) or t.reason or ""]
                for t in report.turns_without_commands
            ],
        ),
        "",
        "## Button-payload turns",
        "",
        "These never reach the command generator and give no training rows.",
        "",
        *_md_table(
            ["where", "test case", "turn", "payload"],
            [[t.location, _case_name(t.test_case), t.turn, f"`{t.text}`"] for t in report.payload_turns],
        ),
        "",
        "## NLU turns",
        "",
        "Their commands set slots without a `from_llm` mapping: the NLU path answers them. They change the dialogue "
        "state and give no training rows.",
        "",
        *_md_table(
            ["where", "test case", "turn", "user says", "commands"],
            [[t.location, _case_name(t.test_case), t.turn, t.text, "; ".join(t.commands)] for t in report.nlu_turns],
        ),
        "",
        "## Command dialects per file",
        "",
        *_md_table(
            ["file", "dialects (command lines)"],
            [[path, _counts_text(counts) or "no commands"] for path, counts in report.dialects.items()],
        ),
        "",
        "## Tracker warnings",
        "",
    ]
    if not report.tracker_warnings:
        lines.append("None.")
    for group, counts in report.tracker_warnings.items():
        lines += [f"- {group}: {_counts_text(counts)}"]
    return "\n".join(lines) + "\n"


def _bar_chart(path: Path, labels: list[str], stacks: list[tuple[str, list[int]]], title: str, xlabel: str) -> None:
    import matplotlib.pyplot as plt

    figure = bar_figure(labels, stacks, title, xlabel)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def bar_figure(labels: list[str], stacks: list[tuple[str, list[int]]], title: str, xlabel: str) -> Any:
    """Horizontal stacked bars of counts: integer ticks, zero bars said in red, the legend above the plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.8))
    left = [0] * len(labels)
    for name, values in stacks:
        axes.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    for index, total in enumerate(left):
        if total:
            axes.text(total, index, f" {total}", va="center")
        else:  # a zero bar has no width: say it in red, so a gap is seen rather than missed
            axes.text(0, index, " 0 (none)", va="center", color="tab:red", fontweight="bold")
    for tick, total in zip(axes.get_yticklabels(), left):
        if not total:
            tick.set_color("tab:red")
    axes.set_xlim(0, max(max(left, default=0), 1) * 1.15)  # room for the count after the longest bar
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 ticks
    axes.invert_yaxis()  # first label on top, as in the tables
    axes.set_xlabel(xlabel)
    if len(stacks) > 1:  # above the plot, where it covers no bar
        axes.set_title(title, pad=26)
        axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(stacks), frameon=False)
    else:
        axes.set_title(title)
    figure.tight_layout()
    return figure


def write_coverage(report: CoverageReport, out_dir: Path) -> list[Path]:
    """Write coverage.md, coverage.json and the charts into `out_dir`; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / "coverage.md",
        out_dir / "coverage.json",
        out_dir / "command_types.png",
        out_dir / "flow_starts.png",
    ]
    write_atomic(paths[0], coverage_markdown(report))
    write_json(paths[1], report.as_dict())
    kinds = [command_label(c.kind, report.syntax) for c in report.command_types]
    _bar_chart(
        paths[2],
        kinds,
        [
            ("written", [c.written for c in report.command_types]),
            ("derived", [c.derived for c in report.command_types]),
        ],
        "Command types in the tests",
        "commands",
    )
    _bar_chart(
        paths[3],
        [f.flow for f in report.flows],
        [("start flow", [f.start_commands for f in report.flows])],
        "start flow commands per user flow",
        "commands",
    )
    return paths
