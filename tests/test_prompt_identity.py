"""Evaluation sees the prompts training saw: the split validation suite, replayed by `recipe evaluate`, renders every
scored turn byte for byte as `val.jsonl` has it (dates included, though the suite lives in another folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from recipe.backends import Completion
from recipe.commands import Syntax
from recipe.evaluate import load_cases
from recipe.prompt import DatetimePolicy, conversation_date_key, conversation_datetime
from recipe.runtime import CommandGenerator


class _NoModel:
    """A backend that is never called: only the generator's renderer is used."""

    name = "none"
    training_info = None

    def complete(self, prompt: str, grammar=None) -> Completion:  # pragma: no cover - never called
        raise AssertionError("no model call expected")


def _val_prompts(splits: Path) -> list[str]:
    rows = [json.loads(line) for line in (splits / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row["prompt"] if "prompt" in row else row["messages"][0]["content"] for row in rows]


def _rendered(project, suite: Path) -> list[str]:
    generator = CommandGenerator.for_model(project, _NoModel())
    cases = load_cases(project, [str(suite)], DatetimePolicy(), Syntax.V2, include_derived=True)
    return [generator.render(case.state, case.user_message, case.when) for case in cases]


def test_evaluate_renders_the_validation_suite_as_val_jsonl_byte_for_byte(
    prepared_example: Path, example_project, tmp_path: Path
):
    split = prepared_example / "4_train_test_split"
    val_prompts = set(_val_prompts(split / "ft_splits"))
    rendered = _rendered(example_project, split / "e2e_tests" / "validation")
    assert len(rendered) >= 20
    assert all("\nNow: " in p for p in rendered)  # dated prompts: the date is what used to differ
    missing = [p for p in rendered if p not in val_prompts]
    assert not missing, f"{len(missing)} of {len(rendered)} evaluate prompts differ from val.jsonl"
    # the suite copied once more, to a deeper folder elsewhere: still the same prompts
    copy = tmp_path / "somewhere" / "else" / "validation"
    shutil.copytree(split / "e2e_tests" / "validation", copy)
    assert _rendered(example_project, copy) == rendered


def test_a_test_cases_date_survives_a_copy_and_the_mocked_fixture_still_wins():
    assert conversation_date_key("e2e_tests/hotels/hotel_du.yml::book a hotel#2") == "hotel_du.yml::book a hotel#2"
    assert conversation_date_key(r"C:\tests\hotel_du.yml::x") == "hotel_du.yml::x"
    here = conversation_datetime("e2e_tests/hotels/hotel_du.yml::book", 42)
    there = conversation_datetime("/tmp/out/4_train_test_split/e2e_tests/validation/hotels/hotel_du.yml::book", 42)
    assert here == there
    assert conversation_datetime("a/hotel_du.yml::other", 42) != here
    mocked = conversation_datetime("a/hotel_du.yml::book", 42, "2026-03-05T14:05:09")
    assert mocked.isoformat() == "2026-03-05T14:05:09+00:00"
