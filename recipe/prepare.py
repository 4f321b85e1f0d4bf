"""`recipe prepare-data`: tests in, train/val files out. The recipe reads as its stages:

    annotate ─ rephrase ─ validate ─ stitch      (per test case, concurrently, in one event loop)
    deduplicate ─ split ─ write                  (over all test cases)

Every LLM call goes through one cached, retrying, bounded client per role, so a re-run or a run resumed after a
crash pays for nothing twice. Each test case's records are written atomically as soon as it is done; a failed call
is recorded and never drops other work or the original rows.

Output layout (that of Rasa Pro's `rasa llm finetune prepare-data`):
    <out>/1_command_annotations/<test file path>/<test case>.yaml
    <out>/2_rephrasings/<test file path>/<test case>.yaml
    <out>/3_llm_finetune_data/llm_ft_data.jsonl
    <out>/4_train_test_split/ft_splits/{train,val}.jsonl  (+ dataset_info.json)
    <out>/4_train_test_split/e2e_tests/{train,validation}/<input tree>/<file>.yml
    <out>/params.yaml, <out>/result_summary.yaml, <out>/cache/ (LLM answers; kept between runs)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from recipe import __version__
from recipe.agents import CUSTOM_COMMANDS_FILE, SUB_AGENTS_FOLDER
from recipe.annotate import (
    TestAnnotation,
    annotate_from_assertions,
    annotate_with_teacher,
)
from recipe.artifacts import (
    DATASET_INFO_FILE,
    FT_DATA_FILE,
    SPLITS_DIR,
    STAGE_DIRS,
    DatasetInfo,
    read_dataset_info,
    write_dataset_info,
)
from recipe.commands import Command, SetSlot, Syntax, format_command, format_commands
from recipe.conversation import mocked_datetime, replay_test_case
from recipe.errors import ConfigError
from recipe.llm import LLMCallFailed, LLMClient, LLMConfig
from recipe.project import Project
from recipe.prompt import (
    COMMAND_PROMPT_VARIABLES,
    DatetimePolicy,
    PromptRenderer,
    PromptTemplate,
    prompt_variables,
    transcript_lines,
)
from recipe.rephrase import (
    REPHRASE_PROMPT_VARIABLES,
    MessageToRephrase,
    RephraseOutcome,
    rephrase_conversation,
    rephrase_prompt,
    rule_based_rephrasings,
)
from recipe.retrieval import flow_retrieval_info
from recipe.split import Split, coverage_features, split_test_cases
from recipe.stitch import Row, conversation_rows
from recipe.testcases import all_test_cases, load_annotated_conversations, load_tests
from recipe.tracker import TranscriptLine
from recipe.types import BotStep, TestCase, TestFile, UserStep
from recipe.validate import (
    LEXICAL,
    Verdict,
    validate_lexically,
    validate_with_oracle,
)
from recipe.yamlio import (
    dump_yaml,
    jsonl_line,
    load_yaml,
    open_atomic,
    plain,
    write_atomic,
    write_yaml,
)

RUN_FILES = (*STAGE_DIRS, "params.yaml", "result_summary.yaml")  # what one run writes; OUT/cache is shared
STAGING_DIR, PREVIOUS_DIR = ".staging", ".previous"  # under OUT: the run being written, the run being replaced
TEST_CASES_IN_FLIGHT_PER_CALL = 4  # test cases started per LLM call allowed in flight (--max-concurrency)
_LOSSY_AT_RUNTIME = re.compile(r"\W$")  # v2/v3 runtime parsers strip trailing non-word characters from values


OutputFormat = Literal["instruction", "conversational"]
Annotator = Literal["auto", "test", "assertions", "llm"]
Validation = Literal["strict", "loose"]


@dataclass(frozen=True)
class PrepareConfig:
    """Everything one run needs, validated by the CLI before any paid call; the single source of prepare-data's
    defaults (the CLI's flags are checked against these by tests/test_prepare_data.py)."""

    tests: list[str]
    out: Path
    syntax: Syntax
    template: PromptTemplate
    datetime_policy: DatetimePolicy
    num_rephrases: int = 10
    train_frac: float = 0.8
    output_format: OutputFormat = "instruction"
    seed: int = 42
    annotator: Annotator = "auto"
    validation: Validation = "strict"  # with an oracle; offline runs use the lexical check
    abstention_rows: bool = False  # turns annotated with no command become `cannot handle` rows
    keep_disagreeing: bool = False  # keep rows whose state the test's own bot turns or assertions contradict
    offline: bool = False
    max_concurrency: int = 16
    rephrase_llm: LLMConfig | None = None
    rephrase_template: PromptTemplate | None = None
    teacher_llm: LLMConfig | None = None
    oracle_llm: LLMConfig | None = None
    show_progress: bool = True
    backoff_base_s: float = 1.0  # first retry wait; tests shorten it
    parameters: dict[str, Any] = field(default_factory=dict)  # the CLI options as given, for params.yaml


@dataclass
class TestCaseResult:
    test_case: TestCase
    annotation: TestAnnotation
    verdicts: dict[int, list[Verdict]]  # turn -> every validated paraphrase
    rows: list[Row]
    rephrase: RephraseOutcome | None
    messages: list[MessageToRephrase]
    errors: list[str]
    tracker_warnings: Counter
    disagreements: dict[int, list[str]] = field(default_factory=dict)  # turn -> where the replay contradicts the test
    inferences: dict[int, list[str]] = field(default_factory=dict)  # turn -> what was read from the test's bot turns
    rows_left_out_disagreeing: int = 0
    reused: bool = False  # taken from OUT/cache: its inputs did not change since the run that made it

    __test__ = False


@dataclass
class PrepareResult:
    out: Path
    summary: dict[str, Any]
    train_rows: int
    val_rows: int


# ---------------------------------------------------------------------------------------------- progress


class _Progress:
    """One bar per stage with counts and ETA; totals grow as the work becomes known."""

    def __init__(self, enabled: bool):
        enabled = enabled and sys.stderr.isatty()  # redrawn bars in a log file are noise; the summary says it all
        names = ("annotate", "rephrase", "validate", "stitch")
        self.bars = {
            name: tqdm(
                total=0,
                desc=f"{name:<9}",
                unit="",
                position=i,
                leave=True,
                disable=not enabled,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            for i, name in enumerate(names)
        }

    def add(self, stage: str, count: int = 1) -> None:
        bar = self.bars[stage]
        bar.total += count
        bar.refresh()

    def done(self, stage: str, count: int = 1) -> None:
        self.bars[stage].update(count)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


# ---------------------------------------------------------------------------------------------- one test case


@dataclass
class _Clients:
    rephraser: LLMClient | None
    teacher: LLMClient | None
    oracle: LLMClient | None


async def _annotate(
    project: Project,
    config: PrepareConfig,
    renderer: PromptRenderer,
    clients: _Clients,
    test_case: TestCase,
    when: datetime | None,
) -> TestAnnotation:
    needs_annotation = any(step.commands is None for step in test_case.user_steps)
    if clients.teacher is not None and needs_annotation and config.annotator in ("auto", "llm"):
        return await annotate_with_teacher(project, test_case, clients.teacher, renderer, config.syntax, when)
    if config.annotator == "test":
        annotation = annotate_from_assertions(project, test_case)
        for turn, step in zip(annotation.turns, test_case.user_steps):
            if step.commands is None and turn.source not in ("payload", "nlu"):
                turn.commands, turn.reason = None, "the test gives no commands (--annotator test)"
        return annotation
    return annotate_from_assertions(project, test_case)


def _messages_to_rephrase(test_case: TestCase, annotation: TestAnnotation) -> list[MessageToRephrase]:
    messages: list[MessageToRephrase] = []
    for turn, step in zip(annotation.turns, test_case.user_steps):
        if turn.trains and turn.commands:
            messages.append(MessageToRephrase(len(messages) + 1, turn.number, step.text))
    return messages


def _values_of(commands: list[Command] | None) -> list[str]:
    return [c.value for c in commands or [] if isinstance(c, SetSlot) and c.value]


def whole_transcript(turns: list) -> str:
    """The conversation from the first user message to the bot's last answer, as `USER:`/`AI:` lines."""
    if not turns:
        return ""
    last = turns[-1]
    said = [TranscriptLine("USER", last.text)] + [TranscriptLine("AI", m.text, m.buttons) for m in last.bot_messages]
    return "\n".join(transcript_lines([*last.state.transcript, *said]))


async def prepare_test_case(
    project: Project,
    config: PrepareConfig,
    renderer: PromptRenderer,
    rephrase_renderer: PromptRenderer | None,
    clients: _Clients,
    test_case: TestCase,
    progress: _Progress,
) -> TestCaseResult:
    """Annotate, rephrase, validate and stitch one test case."""
    when = config.datetime_policy.for_conversation(test_case.id, mocked_datetime(test_case))
    errors: list[str] = []
    annotation = await _annotate(project, config, renderer, clients, test_case, when)
    progress.done("annotate")
    turns = replay_test_case(project, test_case, annotation.commands_for)
    warnings = Counter(w for turn in turns for w in turn.warnings)
    messages = _messages_to_rephrase(test_case, annotation) if config.num_rephrases > 0 else []

    # Rephrase: one call per conversation, or rules offline.
    outcome: RephraseOutcome | None = None
    candidates: dict[int, list[str]] = {}
    if messages:
        if clients.rephraser is not None and rephrase_renderer is not None:
            transcript = whole_transcript(turns)
            outcome = await rephrase_conversation(
                clients.rephraser, rephrase_renderer, test_case.name, transcript, messages, config.num_rephrases
            )
            errors.extend(outcome.errors)
            candidates = outcome.candidates
        else:
            candidates = {
                m.turn: rule_based_rephrasings(
                    m.text,
                    config.num_rephrases,
                    config.seed,
                    values=_values_of(annotation.turns[m.turn - 1].commands),
                    first_turn=m.turn == 1,
                )
                for m in messages
            }
    progress.done("rephrase")

    # Validate every candidate against the original turn's commands.
    by_number = {turn.number: turn for turn in turns}
    verdicts: dict[int, list[Verdict]] = {}

    async def judge(number: int, text: str) -> Verdict:
        turn = by_number[number]
        expected = list(annotation.turns[number - 1].commands or [])
        if clients.oracle is None:
            verdict = validate_lexically(turn.step.text, text, expected)
        else:
            prompt = renderer.render(prompt_variables(project, turn.state, text, when))
            verdict = await validate_with_oracle(
                clients.oracle, prompt, text, expected, config.syntax, config.validation
            )
        progress.done("validate")
        return verdict

    pairs = [(number, text) for number, texts in candidates.items() for text in texts]
    progress.add("validate", len(pairs))
    for (number, _), verdict in zip(pairs, await asyncio.gather(*(judge(n, t) for n, t in pairs))):
        verdicts.setdefault(number, []).append(verdict)
    passing = {n: [v for v in vs if v.passed] for n, vs in verdicts.items()}

    if project.flow_retrieval is not None:  # one embeddings request for every paraphrase, not one per prompt
        project.flow_retrieval.prefetch([verdict.text for verdicts in passing.values() for verdict in verdicts])
    rows, disagreeing = conversation_rows(
        project, renderer, test_case, annotation, passing, when, config.abstention_rows, config.keep_disagreeing
    )
    progress.done("stitch")
    disagreements = {turn.number: turn.disagreements for turn in turns if turn.disagreements}
    inferences = {turn.number: turn.inferences for turn in turns if turn.inferences}
    errors.extend(_failed_call_errors(annotation, verdicts))
    return TestCaseResult(
        test_case,
        annotation,
        verdicts,
        rows,
        outcome,
        messages,
        errors,
        warnings,
        disagreements,
        inferences,
        disagreeing,
    )


def _failed_call_errors(annotation: TestAnnotation, verdicts: dict[int, list[Verdict]]) -> list[str]:
    """One error per role whose calls failed in this test case (the rephraser records its own)."""
    found = []
    teacher = [
        f"turn {t.number}: {t.reason}" for t in annotation.turns if (t.reason or "").startswith("teacher call failed")
    ]
    oracle = [
        f"turn {n}: {v.reason}"
        for n, vs in verdicts.items()
        for v in vs
        if (v.reason or "").startswith("oracle call failed")
    ]
    for role, failures in (("teacher", teacher), ("oracle", oracle)):
        if failures:
            found.append(f"{role}: {len(failures)} call(s) failed after retries; first: {failures[0]}")
    return found


# ---------------------------------------------------------------------------------------------- writing


def _slug(text: str) -> str:
    slug = re.sub(r"[^\w.-]+", "_", text, flags=re.UNICODE).strip("_")
    return slug[:80] or "test_case"


def _record_path(base: Path, test_case: TestCase) -> Path:
    """One file per test case, under the test file's own path: nothing clobbers anything."""
    file_part = Path(test_case.id.rsplit("::", 1)[0]).with_suffix("")
    safe_parts = [part for part in file_part.parts if part not in ("/", "..", ".")]
    digest = hashlib.sha1(test_case.id.encode()).hexdigest()[:6]
    return base.joinpath(*safe_parts) / f"{_slug(test_case.name)}-{digest}.yaml"


def annotated_conversation(result: TestCaseResult, syntax: Syntax, with_rephrasings: bool) -> dict[str, Any]:
    """The `conversations:` record of one test case, as Rasa Pro's tool writes it."""
    steps: list[dict[str, Any]] = []
    turns = iter(result.annotation.turns)
    for step in result.test_case.steps:
        if isinstance(step, UserStep):
            turn = next(turns)
            entry: dict[str, Any] = {"user": step.text}
            if turn.commands is not None:
                entry["llm_commands"] = [format_command(c, syntax) for c in turn.commands]
                entry["commands_source"] = turn.source
            else:
                entry["skipped_reason"] = turn.reason
            if with_rephrasings:
                verdicts = result.verdicts.get(turn.number, [])
                passing = [v.text for v in verdicts if v.passed]
                failing = [v.text for v in verdicts if not v.passed]
                if passing:
                    entry["passing_rephrasings"] = passing
                if failing:
                    entry["failing_rephrasings"] = failing
                    entry["failing_reasons"] = [v.reason for v in verdicts if not v.passed]
            steps.append(entry)
        elif isinstance(step, BotStep):
            steps.append({"utter": step.utter} if step.utter else {"bot": step.text})
    return {"conversations": [{"original_test_case": result.test_case.id, "steps": steps}]}


def test_case_records(result: TestCaseResult, syntax: Syntax) -> tuple[str, str]:
    """The YAML texts of a test case's command annotation and rephrasings records."""
    return (
        dump_yaml(annotated_conversation(result, syntax, False)),
        dump_yaml(annotated_conversation(result, syntax, True)),
    )


def write_test_case_records(out: Path, test_case: TestCase, records: tuple[str, str]) -> None:
    for stage, text in zip(STAGE_DIRS[:2], records, strict=True):
        write_atomic(_record_path(out / stage, test_case), text)


def ft_data_row(row: Row, syntax: Syntax) -> dict[str, Any]:
    return {
        "prompt": row.prompt,
        "output": format_commands(row.commands, syntax),
        "original_test_name": row.test_id,
        "original_user_utterance": row.original_text,
        "rephrased_user_utterance": row.rephrased_text,
        "turn": row.turn,
        "variant": row.variant,
    }


def _tests_root(files: list[TestFile]) -> Path:
    parents = [str(Path(f.path).resolve().parent) for f in files]
    return Path(os.path.commonpath(parents)) if parents else Path(".")


def _in_syntax(raw_case: dict[str, Any], case: TestCase, syntax: Syntax) -> dict[str, Any]:
    """A raw test case whose `commands:` are rewritten in `syntax`: Rasa Pro reads only its generator's dialect."""
    user_steps = iter(case.user_steps)
    steps = []
    for raw_step in raw_case.get("steps", []):
        raw_step = dict(raw_step)
        if "user" in raw_step:
            parsed = next(user_steps)
            if parsed.commands is not None:
                raw_step["commands"] = [format_command(c, syntax) for c in parsed.commands]
        steps.append(raw_step)
    return {**raw_case, "steps": steps}


def write_split_suites(out: Path, files: list[TestFile], split: Split, syntax: Syntax) -> dict[str, int]:
    """The split test suites, written like the inputs: each file keeps its tests' fixtures, all metadata and stubs;
    commands are written in the run's syntax (the inputs may mix dialects, Rasa Pro reads one)."""
    root = _tests_root(files)
    sides = {"train": set(split.train), "validation": set(split.validation)}
    written = {"train": 0, "validation": 0}
    for side, chosen in sides.items():
        side_root = out / STAGE_DIRS[3] / "e2e_tests" / side
        for test_file in files:
            cases = [case for case in test_file.test_cases if case.id in chosen]
            if not cases:
                continue
            names = {case.name for case in cases}
            raw = dict(test_file.raw)
            raw_cases = raw.get("test_cases") or []
            # By position, not by name: Rasa runs every test case of a repeated name, and so do the split suites.
            raw["test_cases"] = [_in_syntax(raw_cases[case.index], case, syntax) for case in cases]
            if isinstance(raw.get("stub_custom_actions"), dict):  # a `<test case>::<action>` stub goes with its test
                raw["stub_custom_actions"] = {
                    key: stub
                    for key, stub in raw["stub_custom_actions"].items()
                    if "::" not in key or key.split("::", 1)[0] in names
                }
            used = {str(f) for case in raw["test_cases"] for f in case.get("fixtures") or []}
            if "fixtures" in raw:
                raw["fixtures"] = [entry for entry in raw["fixtures"] if next(iter(entry)) in used]
                if not raw["fixtures"]:
                    del raw["fixtures"]
            relative = Path(test_file.path).resolve().relative_to(root)
            write_atomic(side_root / relative, dump_yaml(raw))
            written[side] += len(cases)
        # conftest files carry shared fixtures: the split suites need them to run.
        for conftest in sorted(root.rglob("conftest.y*ml")):
            target = side_root / conftest.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(conftest, target)
    return written


def _file_hashes(paths: list[str]) -> dict[str, str]:
    return {
        path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in sorted(set(paths)) if Path(path).is_file()
    }


def _params(project: Project, config: PrepareConfig, files: list[TestFile]) -> dict[str, Any]:
    def describe(llm: LLMConfig | None) -> dict[str, Any] | None:
        return None if llm is None else {k: v for k, v in vars(llm).items() if v is not None}

    return {
        "parameters": config.parameters,
        "provenance": {
            "recipe_version": __version__,
            "command_syntax": config.syntax.value,
            "prompt_template": config.template.path,
            "prompt_template_sha256": config.template.sha256,
            "datetime": "off"
            if not config.datetime_policy.include
            else (
                config.datetime_policy.fixed.isoformat()
                if config.datetime_policy.fixed
                else f"derived per conversation from seed {config.datetime_policy.seed} (mocked_datetime fixtures win)"
            ),
            "rephraser": describe(config.rephrase_llm) or ("rules (offline)" if config.num_rephrases else "none"),
            "teacher": describe(config.teacher_llm) or "assertions (offline)",
            "oracle": describe(config.oracle_llm) or ("lexical check (offline)" if config.num_rephrases else "none"),
            "validation": config.validation if config.oracle_llm else LEXICAL,
            "seed": config.seed,
            "flow_retrieval": flow_retrieval_info(project.flow_retrieval),
            "input_sha256": _file_hashes([f.path for f in files] + project.flow_files + project.domain.files),
        },
    }


# ---------------------------------------------------------------------------------------------- unchanged work


def _run_fingerprint(project: Project, config: PrepareConfig) -> str:
    """What a test case's result depends on besides the test case itself: recipe's own code, the options that change
    results, the LLM roles and the assistant's files. Its LLM and action answers are cached apart."""
    package = Path(__file__).parent
    code = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(package.rglob("*.py")))).hexdigest()
    root = project.root
    project_files = [
        *project.flow_files,
        *project.domain.files,
        *(str(root / name) for name in ("config.yml", "endpoints.yml", CUSTOM_COMMANDS_FILE)),
        *(str(path) for path in sorted((root / SUB_AGENTS_FOLDER).glob("*/config.yml"))),
    ]
    policy = config.datetime_policy
    material = {
        "recipe": [__version__, code],
        "options": [
            config.syntax.value,
            config.template.sha256,
            config.rephrase_template and config.rephrase_template.sha256,
            policy.include,
            str(policy.fixed),
            policy.seed,
            config.num_rephrases,
            config.seed,
            config.annotator,
            config.validation,
            config.abstention_rows,
            config.keep_disagreeing,
            config.offline,
        ],
        "llms": [
            None if llm is None else vars(llm) for llm in (config.rephrase_llm, config.teacher_llm, config.oracle_llm)
        ],
        "project": [
            _file_hashes(project_files),
            str(project.rasa_version),
            project.mcp_servers,
            flow_retrieval_info(project.flow_retrieval),
            getattr(project.action_server, "url", None),
        ],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


class TestCaseReuse:
    """Finished test cases, kept in OUT/cache by everything their result depends on: a re-run neither replays,
    renders nor writes again a test case whose inputs did not change (a failed call is never kept, so it is asked
    again). The test case's own part of the key is its parsed form (steps, fixtures, stubs, metadata, lines).

    Entries are pickles: they hold the commands' exact types, and only this tool writes them, into the run's own
    output folder. One that cannot be read is a miss."""

    __test__ = False
    FORMAT = 1

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = directory
        self.fingerprint = fingerprint

    def key(self, case: TestCase) -> str:
        return hashlib.sha256(f"{self.FORMAT}\0{self.fingerprint}\0{case!r}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pickle"

    def get(self, key: str) -> tuple[TestCaseResult, tuple[str, str]] | None:
        try:
            result, records = pickle.loads(self._path(key).read_bytes())
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001 - a truncated or stale entry is a miss, and gets rewritten
            logging.getLogger("recipe").warning("ignoring unreadable cache entry %s: %s", self._path(key), error)
            return None
        return result, records

    def put(self, key: str, result: TestCaseResult, records: tuple[str, str]) -> None:
        with open_atomic(self._path(key), binary=True) as handle:
            pickle.dump((result, records), handle, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------------------------------- rows on disk


@dataclass(frozen=True)
class SpooledRow:
    """One row on its way to disk: its `llm_ft_data.jsonl` record and what the summary counts about it."""

    record: dict[str, Any]  # ft_data_row()
    kinds: tuple[str, ...] = ()  # the kind of each of its commands
    lossy: tuple[str, ...] = ()  # its values the runtime would alter


def spooled_row(row: Row, syntax: Syntax) -> SpooledRow:
    lossy = tuple(
        f"{row.test_id} turn {row.turn}: {c.slot}={c.value!r}"
        for c in row.commands
        if isinstance(c, SetSlot) and c.value and syntax is not Syntax.V1 and _LOSSY_AT_RUNTIME.search(c.value)
    )
    return SpooledRow(ft_data_row(row, syntax), tuple(c.kind for c in row.commands), lossy)


class RowSpool:
    """Each test case's rows go to disk the moment it is done and come back in input order: a run holds the rows of
    the test cases in flight, not all of them (peak memory does not grow with the number of rows)."""

    def __init__(self, path: Path):
        self._file = path.open("w+b")
        self._blocks: dict[int, tuple[int, int]] = {}  # test case position -> (offset, size)

    def add(self, position: int, rows: list[SpooledRow]) -> None:
        data = b"".join(json.dumps([r.record, r.kinds, r.lossy], ensure_ascii=False).encode() + b"\n" for r in rows)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        self._blocks[position] = (offset, len(data))

    def rows(self) -> Iterator[SpooledRow]:
        for position in sorted(self._blocks):
            offset, size = self._blocks[position]
            self._file.seek(offset)
            for line in self._file.read(size).split(b"\n")[:-1]:
                record, kinds, lossy = json.loads(line)
                yield SpooledRow(record, tuple(kinds), tuple(lossy))

    def close(self) -> None:
        self._file.close()


@dataclass
class SplitRows:
    """What `write_rows_and_split` wrote and counted."""

    split: Split
    before_dedup: int
    kept: int
    train_rows: int
    val_rows: int
    leaked: int  # validation rows dropped because their prompt is also a train prompt
    rows_per_test: Counter  # kept rows per test case id, in input order
    per_command: Counter  # commands of the kept rows, by kind
    lossy: list[str]


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def split_record(record: dict[str, Any], output_format: str) -> dict[str, Any]:
    """A train/val line from an `llm_ft_data.jsonl` record."""
    if output_format == "conversational":
        return {
            "messages": [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["output"]},
            ]
        }
    return {"prompt": record["prompt"], "completion": record["output"]}


def write_rows_and_split(
    rows: Iterable[SpooledRow],
    features_of: Mapping[str, set[str]],
    work: Path,
    output_format: str,
    train_frac: float,
    seed: int,
) -> SplitRows:
    """Deduplicate `rows` (input order; the first of every (prompt, completion) pair is kept) into
    llm_ft_data.jsonl, split the test cases that have rows, and write train.jsonl and val.jsonl; a validation row
    whose prompt is a train prompt is dropped. Streams: only a digest per row stays in memory."""
    ft_path = work / STAGE_DIRS[2] / FT_DATA_FILE
    seen: set[bytes] = set()
    kept: list[tuple[str, bytes]] = []  # (test case id, prompt digest) of every kept row, in file order
    per_command: Counter = Counter()
    lossy: set[str] = set()
    before = 0
    with open_atomic(ft_path) as ft:
        for row in rows:
            before += 1
            key = _digest(f"{row.record['prompt']}\0{row.record['output']}")
            if key in seen:
                continue
            seen.add(key)
            ft.write(jsonl_line(row.record))
            kept.append((row.record["original_test_name"], _digest(row.record["prompt"])))
            per_command.update(row.kinds)
            lossy.update(row.lossy)
    del seen
    rows_per_test = Counter(test_id for test_id, _ in kept)  # counted once: a scan per test case is quadratic
    missing = [test_id for test_id in rows_per_test if test_id not in features_of]
    if missing:
        raise ConfigError(
            f"--merge: test case {missing[0]} has rows but no annotation record in any shard; expected "
            "complete output folders"
        )
    split = split_test_cases({test_id: features_of[test_id] for test_id in rows_per_test}, train_frac, seed)
    train_ids = set(split.train)
    splits_dir = work / SPLITS_DIR
    train_prompts: set[bytes] = set()
    counts = {"train": 0, "val": 0, "leaked": 0}
    for side in ("train", "val"):
        with open_atomic(splits_dir / f"{side}.jsonl") as out, ft_path.open(encoding="utf-8", newline="") as ft:
            for (test_id, prompt_key), line in zip(kept, ft, strict=True):
                if (test_id in train_ids) != (side == "train"):
                    continue
                if side == "train":
                    train_prompts.add(prompt_key)
                elif prompt_key in train_prompts:
                    counts["leaked"] += 1
                    continue
                out.write(jsonl_line(split_record(json.loads(line), output_format)))
                counts[side] += 1
    return SplitRows(
        split,
        before,
        len(kept),
        counts["train"],
        counts["val"],
        counts["leaked"],
        rows_per_test,
        per_command,
        sorted(lossy),
    )


# ---------------------------------------------------------------------------------------------- the run


def check_output_folder(out: Path, tests: list[str], project_root: Path) -> None:
    """`-o` must be a folder we can write, and outside every tests folder (else a re-run reads its own split suites
    back in as tests); a `ConfigError` before anything is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out}: is a file; expected a folder (new or from an earlier run)")
    existing = next((folder for folder in (out, *out.absolute().parents) if folder.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"-o {out}: {existing} is not a folder; expected a folder path we can create")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"-o {out}: {existing} is not writable; expected a folder we can write to")
    resolved = out.resolve()
    for spec in tests:
        base = Path(spec.split("::", 1)[0])
        for folder in (base, project_root / base):
            if folder.is_dir() and resolved.is_relative_to(folder.resolve()):
                raise ConfigError(
                    f"-o {out}: is inside the tests folder {spec}; a later run would read this run's "
                    "split suites as tests; expected an output folder outside the tests"
                )


def _check_templates(project: Project, config: PrepareConfig, cases: list[TestCase]) -> None:
    """Render each template once on a real state (the first user turn), before anything is written or paid for."""
    case = next((c for c in cases if c.user_steps), None)
    if case is None:
        return
    when = config.datetime_policy.for_conversation(case.id, mocked_datetime(case))
    annotation = annotate_from_assertions(project, case)
    turns = replay_test_case(project, case, annotation.commands_for)
    checks = [
        (
            config.template,
            lambda: PromptRenderer(config.template, COMMAND_PROMPT_VARIABLES).render(
                prompt_variables(project, turns[0].state, turns[0].step.text, when)
            ),
        )
    ]
    if config.rephrase_template is not None and config.rephrase_llm is not None and not config.offline:
        messages = [MessageToRephrase(1, 1, turns[0].step.text)]
        rephrase_template = config.rephrase_template
        checks.append(
            (
                config.rephrase_template,
                lambda: rephrase_prompt(
                    PromptRenderer(rephrase_template, REPHRASE_PROMPT_VARIABLES),
                    case.name,
                    whole_transcript(turns),
                    messages,
                    max(config.num_rephrases, 1),
                ),
            )
        )
    for template, render in checks:
        try:
            render()
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - a template calling something on a wrong-typed value: one line
            raise ConfigError(
                f"{template.path}: the template fails to render: {type(error).__name__}: {error}"
            ) from None


def _role_clients(config: PrepareConfig, cache: Path | None) -> _Clients:
    in_flight: dict = {}  # shared, like the cache: an identical request from two roles at once is paid once

    def client(role: str, llm: LLMConfig | None) -> LLMClient | None:
        if llm is None or config.offline:
            return None
        return LLMClient(
            llm,
            cache_dir=cache,
            max_concurrency=config.max_concurrency,
            seed=config.seed,
            backoff_base_s=config.backoff_base_s,
            backoff_cap_s=max(30 * config.backoff_base_s, 0.5),
            role=role,
            refuse_incomplete=True,
            in_flight=in_flight,
        )

    rephrase_needed = config.num_rephrases > 0
    return _Clients(
        rephraser=client("rephraser", config.rephrase_llm) if rephrase_needed else None,
        teacher=client("teacher", config.teacher_llm) if config.annotator in ("auto", "llm") else None,
        oracle=client("oracle", config.oracle_llm) if rephrase_needed else None,
    )


async def check_llm_endpoints(config: PrepareConfig) -> None:
    """One unpaid call per configured endpoint before any work: a bad key, an unknown model or an unreachable
    endpoint ends the run with one line naming the role (a `ConfigError`)."""
    clients = _role_clients(config, cache=None)
    checked: dict[tuple, str | None] = {}
    try:
        for llm_client in vars(clients).values():
            if llm_client is None:
                continue
            same = (llm_client.config, llm_client.config.api_key())
            if same not in checked:
                checked[same] = await llm_client.check_endpoint()
            if checked[same] is not None:
                raise ConfigError(f"{llm_client.endpoint}: {checked[same]}")
    finally:
        for llm_client in vars(clients).values():
            if llm_client is not None:
                await llm_client.aclose()


def _stopping_error(errors: BaseExceptionGroup) -> BaseException:
    """The one error to report from a failed run: a call that fails every call (bad key, unknown model) first."""
    leaves: list[BaseException] = []

    def flatten(group: BaseExceptionGroup) -> None:
        for error in group.exceptions:
            flatten(error) if isinstance(error, BaseExceptionGroup) else leaves.append(error)

    flatten(errors)
    for error in leaves:
        if isinstance(error, LLMCallFailed) and error.fails_every_call:
            return ConfigError(
                f"{error.endpoint or 'an LLM'}: {error.last_error}; stopped at once, since every "
                "call would fail the same way (answers received so far are cached)"
            )
    for error in leaves:
        if not isinstance(error, LLMCallFailed):
            return error
    return leaves[0]


async def _run_test_cases(
    project: Project, config: PrepareConfig, cases: list[TestCase], work: Path, spool: RowSpool
) -> tuple[list[TestCaseResult], dict[str, Any]]:
    clients = _role_clients(config, config.out / "cache" / "llm")
    reuse = TestCaseReuse(config.out / "cache" / "test_cases", _run_fingerprint(project, config))
    renderer = PromptRenderer(config.template, COMMAND_PROMPT_VARIABLES)
    rephrase_renderer = (
        PromptRenderer(config.rephrase_template, REPHRASE_PROMPT_VARIABLES) if config.rephrase_template else None
    )
    progress = _Progress(config.show_progress)
    for stage in ("annotate", "rephrase", "stitch"):
        progress.add(stage, len(cases))

    # Test cases in flight are bounded: each holds its replayed states and rows until it is done, so memory follows
    # this bound, not the number of test cases. Enough of them keep every role's calls in flight (a test case's
    # calls form a chain: annotate, rephrase, then validate).
    in_flight = asyncio.Semaphore(TEST_CASES_IN_FLIGHT_PER_CALL * max(config.max_concurrency, 1))

    async def one(position: int, case: TestCase) -> TestCaseResult:
        key = reuse.key(case)
        async with in_flight:
            reused = reuse.get(key)
            if reused is not None:
                result, records = reused
                # The live test case replaces the stored copy (equal by the key), which is then freed.
                result = dataclasses.replace(
                    result, test_case=case, annotation=dataclasses.replace(result.annotation, test_case=case)
                )
                for stage in ("annotate", "rephrase", "stitch"):
                    progress.done(stage)
            else:
                result = await prepare_test_case(project, config, renderer, rephrase_renderer, clients, case, progress)
                records = test_case_records(result, config.syntax)
                if not result.errors:  # a failed call is asked again next run
                    reuse.put(key, result, records)
            write_test_case_records(work, case, records)
            spool.add(position, [spooled_row(row, config.syntax) for row in result.rows])
        return dataclasses.replace(result, rows=[], reused=reused is not None)  # its rows are on disk now

    try:
        # A task group: the first error that stops the run (a rejected key) cancels the other test cases cleanly.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(position, case)) for position, case in enumerate(cases)]
    except BaseExceptionGroup as errors:
        raise _stopping_error(errors) from None
    finally:
        progress.close()
        usage = {}
        for role, llm_client in vars(clients).items():
            if llm_client is not None:
                usage[role] = llm_client.usage_summary()
                if llm_client.down is not None:
                    usage[role]["down"] = llm_client.down
                await llm_client.aclose()
    return [task.result() for task in tasks], usage


def _fresh_staging(out: Path) -> Path:
    """An empty folder for this run's outputs; what an interrupted run left there is dropped (its answers are in
    OUT/cache)."""
    for name in (STAGING_DIR, PREVIOUS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    staging = out / STAGING_DIR
    staging.mkdir(parents=True)
    return staging


def _swap_in(staging: Path, out: Path) -> None:
    """Replace the previous run's outputs with this run's: moved aside, moved in, then the old ones deleted."""
    previous = out / PREVIOUS_DIR
    previous.mkdir(exist_ok=True)
    for name in RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, previous / name)
    for name in RUN_FILES:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def prepare_data(project: Project, config: PrepareConfig) -> PrepareResult:
    """Run every stage and write the outputs; see the module docstring for the layout.

    Every input is checked (tests, output folder, templates rendered once, each LLM endpoint called once) before
    `config.out` is touched; the run is written into OUT/.staging and swapped in at the end, so a failed or
    interrupted run leaves the previous run's outputs as they were."""
    files = load_tests(config.tests, project)
    cases = all_test_cases(files)
    check_output_folder(config.out, config.tests, project.root)
    _check_templates(project, config, cases)
    if not config.offline:
        asyncio.run(check_llm_endpoints(config))
    work = _fresh_staging(config.out)
    write_yaml(work / "params.yaml", _params(project, config, files))

    spool = RowSpool(work / ".rows")
    try:
        results, usage = asyncio.run(_run_test_cases(project, config, cases, work, spool))
        features = {
            result.test_case.id: coverage_features([c for turn in result.annotation.turns for c in turn.commands or []])
            for result in results
        }
        rows = write_rows_and_split(spool.rows(), features, work, config.output_format, config.train_frac, config.seed)
    finally:
        spool.close()
    split = rows.split
    splits_dir = work / SPLITS_DIR
    info = DatasetInfo(
        prompt_template=config.template.path,
        prompt_template_sha256=config.template.sha256,
        prompt_template_text=config.template.text,
        command_syntax=config.syntax.value,
        rasa_version=str(project.rasa_version),
        output_format=config.output_format,
        include_date_time=config.datetime_policy.include,
        flow_retrieval=flow_retrieval_info(project.flow_retrieval),
        num_train_rows=rows.train_rows,
        num_val_rows=rows.val_rows,
        seed=config.seed,
        recipe_version=__version__,
    )
    write_dataset_info(splits_dir, info)
    suites = write_split_suites(work, [f for f in files if f.test_cases], split, config.syntax)

    if config.abstention_rows and not rows.per_command["cannot handle"]:
        logging.getLogger("recipe").warning(
            "--abstention-rows: no turn has empty commands (`commands: []`), so no `cannot handle` row was made"
        )
    summary = _summary(results, rows, suites, usage, config)
    if project.action_server is not None:
        summary["recipe"]["action_server"] = project.action_server.usage_summary()
    write_yaml(work / "result_summary.yaml", summary)
    _swap_in(work, config.out)
    return PrepareResult(out=config.out, summary=summary, train_rows=rows.train_rows, val_rows=rows.val_rows)


def _shard_rows(path: Path) -> Iterator[SpooledRow]:
    with path.open(encoding="utf-8", newline="") as lines:
        for line in lines:
            if line.strip():
                yield SpooledRow(json.loads(line))


def _shard_features(shard: Path, project: Project) -> dict[str, set[str]]:
    """Test case id -> coverage features, read back from a shard's command annotations (every turn's commands)."""
    features: dict[str, set[str]] = {}
    for record in sorted((shard / STAGE_DIRS[0]).rglob("*.yaml")):
        for conversation in load_annotated_conversations(record, project):
            commands = [c for step in conversation["steps"] for c in step.get("llm_commands") or []]
            features[conversation["original_test_case"]] = coverage_features(commands)
    return features


def merge_prepared(
    project: Project, shards: list[Path], out: Path, tests: list[str], train_frac: float = 0.8, seed: int = 42
) -> PrepareResult:
    """One data set from the output folders of several `prepare-data` runs (shards of the tests, e.g. one test file
    each, each with its own cache): rows concatenated in shard order and deduplicated, then split and written as
    one run writes them (`tests`: every shard's tests, read for the split suites). Sharding by test file in the
    order one run reads the files gives byte-identical train/val files to that one run."""
    if not shards:
        raise ConfigError("--merge: expected the output folders of one or more prepare-data runs")
    infos = []
    for shard in shards:
        info_path = shard / SPLITS_DIR / DATASET_INFO_FILE
        if not info_path.is_file():
            raise ConfigError(f"{info_path}: not found; expected the output folder of a finished prepare-data run")
        infos.append(read_dataset_info(info_path))
    for key in ("command_syntax", "prompt_template_sha256", "output_format", "include_date_time", "rasa_version"):
        values = {str(getattr(info, key)) for info in infos}
        if len(values) > 1:
            raise ConfigError(
                f"--merge: the shards differ in {key} ({', '.join(sorted(values))}); expected shards "
                "prepared with the same options"
            )
    syntax, output_format = Syntax(str(infos[0].command_syntax)), str(infos[0].output_format)
    check_output_folder(out, tests, project.root)
    features_of: dict[str, set[str]] = {}
    for shard in shards:
        features_of |= _shard_features(shard, project)
        if not (shard / STAGE_DIRS[2] / FT_DATA_FILE).is_file():
            raise ConfigError(
                f"{shard / STAGE_DIRS[2] / FT_DATA_FILE}: not found; expected the output folder "
                "of a finished prepare-data run"
            )
    files = load_tests(tests, project)
    known = {case.id for f in files for case in f.test_cases}
    unknown = [test_id for test_id in features_of if test_id not in known]
    if unknown:
        raise ConfigError(
            f"--merge: test case {unknown[0]} of a shard is not among the tests given "
            f"({', '.join(tests)}); expected every shard's tests, named as the shards were run"
        )

    work = _fresh_staging(out)
    for stage in STAGE_DIRS[:2]:  # one record per test case, under its own path: shards never collide
        for shard in shards:
            if (shard / stage).is_dir():
                shutil.copytree(shard / stage, work / stage, dirs_exist_ok=True)
    shard_rows = (row for shard in shards for row in _shard_rows(shard / STAGE_DIRS[2] / FT_DATA_FILE))
    try:
        rows = write_rows_and_split(shard_rows, features_of, work, output_format, train_frac, seed)
    except ConfigError:
        shutil.rmtree(work, ignore_errors=True)  # nothing was swapped in: the previous outputs stay
        raise
    split, rows_per_test, train_ids = rows.split, rows.rows_per_test, set(rows.split.train)
    splits_dir = work / SPLITS_DIR
    write_dataset_info(
        splits_dir, dataclasses.replace(infos[0], num_train_rows=rows.train_rows, num_val_rows=rows.val_rows, seed=seed)
    )
    suites = write_split_suites(work, [f for f in files if f.test_cases], split, syntax)
    shard_summaries = [plain(load_yaml(shard / "result_summary.yaml")) or {} for shard in shards]
    summary = {
        "merged_from": [str(shard) for shard in shards],
        "num_input_e2e_tests": sum(s.get("num_input_e2e_tests", 0) for s in shard_summaries),
        "num_annotated_conversations": sum(s.get("num_annotated_conversations", 0) for s in shard_summaries),
        "num_ft_data_points": rows.kept,
        "num_train_data_points": rows.train_rows,
        "num_val_data_points": rows.val_rows,
        "recipe": {
            "rows": {
                "before_dedup": rows.before_dedup,
                "duplicates_dropped": rows.before_dedup - rows.kept,
                "validation_rows_dropped_as_in_train": rows.leaked,
            },
            "split": {
                "train_test_cases": len(split.train),
                "validation_test_cases": len(split.validation),
                "covering_test_cases": split.cover,
                "validation_lacks": split.validation_lacks,
                "train_suites_test_cases": suites["train"],
                "validation_suites_test_cases": suites["validation"],
            },
            "errors": [e for s in shard_summaries for e in (s.get("recipe") or {}).get("errors", [])],
            "estimated_cost_usd": round(
                sum((s.get("recipe") or {}).get("estimated_cost_usd", 0) or 0 for s in shard_summaries), 4
            ),
            "per_test_case": {
                test_id: {"rows": rows_per_test[test_id], "split": "train" if test_id in train_ids else "validation"}
                for test_id in rows_per_test
            },
        },
    }
    write_yaml(
        work / "params.yaml",
        {
            "merged_from": [str(shard) for shard in shards],
            "tests": list(tests),
            "train_frac": train_frac,
            "seed": seed,
            "shards": [plain(load_yaml(shard / "params.yaml")) for shard in shards],
        },
    )
    write_yaml(work / "result_summary.yaml", summary)
    _swap_in(work, out)
    return PrepareResult(out=out, summary=summary, train_rows=rows.train_rows, val_rows=rows.val_rows)


def _summary(
    results: list[TestCaseResult], rows: SplitRows, suites: dict[str, int], usage: dict[str, Any], config: PrepareConfig
) -> dict[str, Any]:
    split, rows_per_test = rows.split, rows.rows_per_test
    train_ids, validation_ids = set(split.train), set(split.validation)
    verdicts = [v for r in results for vs in r.verdicts.values() for v in vs]
    annotated = [r for r in results if any(t.commands for t in r.annotation.turns)]
    skipped = [
        {"test": r.test_case.id, "turn": t.number, "reason": t.reason}
        for r in results
        for t in r.annotation.turns
        if t.commands is None
    ]
    # Turns the command generator never answers: they change the dialogue state but yield no rows.
    not_generator = [
        {"test": r.test_case.id, "turn": t.number, "reason": t.reason, "source": t.source}
        for r in results
        for t in r.annotation.turns
        if t.source in ("payload", "nlu")
    ]
    warnings: Counter[str] = Counter()
    for result in results:
        warnings.update(result.tracker_warnings)
    requested = sum(r.rephrase.requested if r.rephrase else len(r.messages) * config.num_rephrases for r in results)
    received = sum(len(vs) for r in results for vs in r.verdicts.values())
    per_test = {
        r.test_case.id: {
            "annotated_turns": sum(1 for t in r.annotation.turns if t.commands),
            "skipped_turns": sum(1 for t in r.annotation.turns if t.commands is None),
            "payload_turns": sum(1 for t in r.annotation.turns if t.source == "payload"),
            "nlu_turns": sum(1 for t in r.annotation.turns if t.source == "nlu"),
            "rephrasings_passing": sum(v.passed for vs in r.verdicts.values() for v in vs),
            "rephrasings_failing": sum(not v.passed for vs in r.verdicts.values() for v in vs),
            "rows": rows_per_test[r.test_case.id],
            "split": "train"
            if r.test_case.id in train_ids
            else ("validation" if r.test_case.id in validation_ids else "none (no rows)"),
            **({"state_disagreements": dict(r.disagreements)} if r.disagreements else {}),
            **({"state_inferences": dict(r.inferences)} if r.inferences else {}),
            **({"errors": r.errors} if r.errors else {}),
        }
        for r in results
    }
    return {
        "num_input_e2e_tests": len(results),
        "num_annotated_conversations": len(annotated),
        "num_user_messages_across_conversations": sum(len(r.test_case.user_steps) for r in annotated),
        "num_user_messages_to_rephrase_across_conversations": sum(len(r.messages) for r in results),
        "num_passing_rephrased_user_messages": sum(v.passed for v in verdicts),
        "num_failing_rephrased_user_messages": sum(not v.passed for v in verdicts),
        "num_ft_data_points": rows.kept,
        "num_train_data_points": rows.train_rows,
        "num_val_data_points": rows.val_rows,
        "recipe": {
            # Test cases whose result came from OUT/cache: nothing they depend on changed since it was made.
            "test_cases_reused": sum(r.reused for r in results),
            # Turns after which the replayed state contradicts the test's own bot turns or assertions.
            "state_disagreements": sum(len(r.disagreements) for r in results),
            "rows_left_out_disagreeing": sum(r.rows_left_out_disagreeing for r in results),
            "state_inferences": sum(len(what) for r in results for what in r.inferences.values()),
            "rephrasings": {
                "requested": requested,
                "received": received,
                "passing": sum(v.passed for v in verdicts),
                "failing": sum(not v.passed for v in verdicts),
                "check": config.validation if config.oracle_llm and not config.offline else LEXICAL,
            },
            "rows": {
                "before_dedup": rows.before_dedup,
                "duplicates_dropped": rows.before_dedup - rows.kept,
                "validation_rows_dropped_as_in_train": rows.leaked,
                "per_command_type": dict(sorted(rows.per_command.items())),
            },
            "split": {
                "train_test_cases": len(split.train),
                "validation_test_cases": len(split.validation),
                "covering_test_cases": split.cover,
                "validation_lacks": split.validation_lacks,
                "train_suites_test_cases": suites["train"],
                "validation_suites_test_cases": suites["validation"],
            },
            "skipped_turns": skipped,
            "turns_without_rows": {
                "payload": sum(1 for t in not_generator if t["source"] == "payload"),
                "nlu": sum(1 for t in not_generator if t["source"] == "nlu"),
            },
            "nlu_turns": [{k: v for k, v in t.items() if k != "source"} for t in not_generator if t["source"] == "nlu"],
            "values_the_runtime_would_alter": rows.lossy,
            "tracker_warnings": dict(warnings.most_common()),
            "errors": [f"{r.test_case.id}: {e}" for r in results for e in r.errors],
            # Every call that failed after its retries, per role (each makes the run exit 1), and roles that stopped
            # being called; empty or cut answers are retried and counted in llm_usage, never kept.
            "failed_llm_calls": {role: u.get("failures", 0) for role, u in usage.items()},
            "llm_roles_down": {role: u["down"] for role, u in usage.items() if u.get("down")},
            "llm_usage": usage,
            "estimated_cost_usd": round(sum(u.get("estimated_cost_usd", 0) or 0 for u in usage.values()), 4),
            "per_test_case": per_test,
        },
    }


def failure_lines(summary: dict[str, Any]) -> list[str]:
    """What failed, per role, for stderr: empty when every LLM call succeeded."""
    extra = summary["recipe"]
    lines = []
    for role, failed in extra.get("failed_llm_calls", {}).items():
        usage = extra["llm_usage"].get(role, {})
        if not failed:
            continue
        incomplete = []
        if usage.get("truncated"):
            incomplete.append(
                f"{usage['truncated']} answer(s) cut at the token limit: raise max_completion_tokens "
                f"in the {role}'s LLM config"
            )
        if usage.get("empty_answers"):
            incomplete.append(f"{usage['empty_answers']} empty answer(s)")
        down = extra.get("llm_roles_down", {}).get(role)
        lines.append(
            f"{role}: {failed} LLM call(s) failed after retries"
            + (f" ({usage.get('not_sent', 0)} not sent: the {role} is down: {down})" if down else "")
            + (f"; {'; '.join(incomplete)}" if incomplete else "")
        )
    return lines


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A short human summary for the terminal."""
    extra = summary["recipe"]
    return [
        f"test cases: {summary['num_input_e2e_tests']} ({summary['num_annotated_conversations']} annotated"
        + (
            f"; {extra['test_cases_reused']} unchanged since the last run, taken from the cache"
            if extra.get("test_cases_reused")
            else ""
        )
        + ")",
        f"rephrasings: {extra['rephrasings']['passing']} passing, {extra['rephrasings']['failing']} failing "
        f"({extra['rephrasings']['check']} check)",
        f"rows: {summary['num_ft_data_points']} ({extra['rows']['duplicates_dropped']} duplicates dropped)",
        f"split: {summary['num_train_data_points']} train rows / {summary['num_val_data_points']} val rows "
        f"({extra['split']['train_test_cases']} / {extra['split']['validation_test_cases']} test cases)"
        + (
            "; no validation rows: finetune will train without validation" if not summary["num_val_data_points"] else ""
        ),
        f"state disagreements with the tests' own bot turns: {extra['state_disagreements']} "
        f"({extra['rows_left_out_disagreeing']} rows left out; --keep-disagreeing keeps them); "
        f"inferred from bot turns: {extra['state_inferences']}",
        f"skipped turns: {len(extra['skipped_turns'])}; payload turns: {extra['turns_without_rows']['payload']}; "
        f"NLU turns: {extra['turns_without_rows']['nlu']}; LLM errors: {len(extra['errors'])}; "
        f"estimated cost: ${extra['estimated_cost_usd']}",
    ]
