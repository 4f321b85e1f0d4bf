"""What a run writes per test case and per split, and the record the writers read.

    <out>/1_command_annotations/..., <out>/2_rephrasings/...   `test_case_records`, `write_test_case_records`
    <out>/3_llm_finetune_data/llm_ft_data.jsonl                `RowSpool`, `write_rows_and_split`
    <out>/4_train_test_split/ft_splits/{train,val}.jsonl       `write_rows_and_split`
    <out>/4_train_test_split/e2e_tests/...                     `write_split_suites`

`recipe.prepare` runs the pipeline and calls these; `--merge` shares the row writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.annotate import TestAnnotation
from recipe.artifacts import FT_DATA_FILE, SPLITS_DIR, STAGE_DIRS
from recipe.commands import SetSlot, Syntax, format_command, format_commands
from recipe.errors import ConfigError
from recipe.rephrase import MessageToRephrase, RephraseOutcome
from recipe.split import Split, split_test_cases
from recipe.stitch import Row
from recipe.types import BotStep, TestCase, TestFile, UserStep
from recipe.validate import Verdict
from recipe.yamlio import dump_yaml, jsonl_line, open_atomic, write_atomic

_LOSSY_AT_RUNTIME = re.compile(r"\W$")  # v2/v3 runtime parsers strip trailing non-word characters from values


@dataclass
class TestCaseResult:
    """One test case done: its annotation, paraphrase verdicts, rows and errors; its records and its part of the
    summary are written from it (and `TestCaseReuse` keeps it)."""

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


# ---------------------------------------------------------------------------------------------- test case records


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
