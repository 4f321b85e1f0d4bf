"""Finetuning rows from the bundled example assistant, for the finetune tests, the notebook test and the bench.

`example_rows()` runs `recipe prepare-data` offline on part of the bundled example (once per process) and returns its
instruction rows `{"prompt", "completion"}` (v2 syntax, one command per line, no trailing newline), train rows first.
The prompts are rendered through a compact template (`tests/data/compact_prompt.jinja2`) so that the tiny test model
trains in seconds; the pipeline that renders them is the real one.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPACT_TEMPLATE = ROOT / "tests" / "data" / "compact_prompt.jinja2"
EXAMPLE_TESTS = ["e2e_tests/hotels/hotel_du.yml", "e2e_tests/cars/rental_car_du.yml", "e2e_tests/du/general_du.yml"]


@lru_cache(maxsize=1)
def _prepared_rows() -> tuple[str, ...]:
    from recipe.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "output"
        argv = [
            "prepare-data",
            *(str(ROOT / t) for t in EXAMPLE_TESTS),
            "--project",
            str(ROOT),
            "--offline",
            "--no-progress",
            "--no-datetime",
            "--num-rephrases",
            "1",
            "--prompt-template",
            str(COMPACT_TEMPLATE),
            "-o",
            str(out),
        ]
        if main(argv) != 0:
            raise RuntimeError("prepare-data failed on the bundled example")
        splits = out / "4_train_test_split" / "ft_splits"
        lines = (splits / "train.jsonl").read_text(encoding="utf-8").splitlines()
        lines += (splits / "val.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(lines)


def example_rows() -> list[dict]:
    """Instruction rows of the bundled example in a fixed order (a fresh copy each call)."""
    return [json.loads(line) for line in _prepared_rows()]


def rows_with_distinct_starts(rows: list[dict], count: int = 4) -> tuple[int, ...]:
    """Indexes of the first rows whose completions start with different words (so they differ from the first
    token on): an overfit model must tell them apart by the prompt alone."""
    chosen: dict[str, int] = {}
    for index, row in enumerate(rows):
        chosen.setdefault(row["completion"].split()[0], index)
    indexes = sorted(chosen.values())[:count]
    if len(indexes) < count:
        raise RuntimeError(f"only {len(indexes)} distinct completion starts in the example rows")
    return tuple(indexes)
