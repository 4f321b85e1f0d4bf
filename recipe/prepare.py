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

The files of stages 1-4 are written by `recipe.records`, `result_summary.yaml` is made by `recipe.prepare_summary`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
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
from recipe.commands import Command, SetSlot, Syntax
from recipe.conversation import mocked_datetime, replay_test_case
from recipe.errors import ConfigError
from recipe.llm import LLMCallFailed, LLMClient, LLMConfig
from recipe.prepare_summary import run_summary, split_section
from recipe.project import Project
from recipe.prompt import (
    COMMAND_PROMPT_VARIABLES,
    DatetimePolicy,
    PromptRenderer,
    PromptTemplate,
    prompt_variables,
    transcript_lines,
)
from recipe.records import (
    RowSpool,
    SpooledRow,
    TestCaseResult,
    spooled_row,
    test_case_records,
    write_rows_and_split,
    write_split_suites,
    write_test_case_records,
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
from recipe.split import coverage_features
from recipe.stitch import conversation_rows
from recipe.testcases import all_test_cases, load_annotated_conversations, load_tests
from recipe.tracker import TranscriptLine
from recipe.types import TestCase, TestFile
from recipe.validate import (
    LEXICAL,
    Verdict,
    validate_lexically,
    validate_with_oracle,
)
from recipe.yamlio import (
    load_yaml,
    open_atomic,
    plain,
    write_yaml,
)

RUN_FILES = (*STAGE_DIRS, "params.yaml", "result_summary.yaml")  # what one run writes; OUT/cache is shared
STAGING_DIR, PREVIOUS_DIR = ".staging", ".previous"  # under OUT: the run being written, the run being replaced
TEST_CASES_IN_FLIGHT_PER_CALL = 4  # test cases started per LLM call allowed in flight (--max-concurrency)


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
    check = config.validation if config.oracle_llm and not config.offline else LEXICAL
    summary = run_summary(results, rows, suites, usage, config.num_rephrases, check)
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
            "split": split_section(rows, suites),
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
