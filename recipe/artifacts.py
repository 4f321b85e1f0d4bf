"""The files passed between stages: named once here, each with one reader and one writer.

    prepare-data  OUT/1_command_annotations/, 2_rephrasings/    one `conversations:` record per test case
                  OUT/3_llm_finetune_data/llm_ft_data.jsonl     every row, with its test, original and paraphrase
                  OUT/4_train_test_split/ft_splits/             train.jsonl, val.jsonl, dataset_info.json
    finetune      RUN/recipe_training_info.json                 dataset_info.json's keys + what training did
                  RUN/merged/                                   the merged model (with --merge)

`dataset_info.json` says how the rows were made (template, syntax, dates, flow retrieval); finetune copies it into
the training info, and everything that serves or evaluates the model renders its prompts from there. Kept free of
heavy imports: the runtime reads these without loading the trainer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError, InputError

STAGE_DIRS = ("1_command_annotations", "2_rephrasings", "3_llm_finetune_data", "4_train_test_split")
FT_DATA_FILE = "llm_ft_data.jsonl"  # under STAGE_DIRS[2]
SPLITS_DIR = Path(STAGE_DIRS[3]) / "ft_splits"
SPLIT_SUITES_DIR = Path(STAGE_DIRS[3]) / "e2e_tests"
TRAIN_FILE, VAL_FILE, DATASET_INFO_FILE = "train.jsonl", "val.jsonl", "dataset_info.json"
TRAINING_INFO_FILE = "recipe_training_info.json"
MERGED_DIR = "merged"


@dataclass(frozen=True)
class DatasetInfo:
    """`dataset_info.json`: how prepare-data made the rows (written once per run; `--merge` keeps the shards')."""

    prompt_template: str | None
    prompt_template_sha256: str | None
    prompt_template_text: str | None
    command_syntax: str | None
    rasa_version: str | None  # the release whose commands the rows use (--rasa-version)
    output_format: str | None
    include_date_time: bool | None
    flow_retrieval: dict[str, Any] | None  # how the prompts listed flows: serve with the same (rasa-config writes it)
    num_train_rows: int | None
    num_val_rows: int | None
    seed: int | None
    recipe_version: str | None

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> DatasetInfo:
        """Every key, None where the file lacks it (data from an older release, or written by hand)."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_dataset_info(splits_dir: Path, info: DatasetInfo) -> None:
    from recipe.yamlio import write_json

    write_json(splits_dir / DATASET_INFO_FILE, info.as_dict())


def read_dataset_info(path: Path) -> DatasetInfo:
    """A `dataset_info.json`; a file that is not a JSON object is an error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(str(path), error.lineno, f"invalid JSON: {error.msg}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise InputError(str(path), 1, "expected a JSON object (prepare-data's dataset_info.json)")
    return DatasetInfo.from_mapping(data)


def write_training_info(model_dir: Path, info: dict[str, Any]) -> None:
    (model_dir / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_training_info(model_dir: Path) -> dict[str, Any] | None:
    """`recipe_training_info.json` of a `recipe finetune` folder, or None for any other model folder."""
    path = model_dir / TRAINING_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return info


def require_training_info(model_dir: Path) -> dict[str, Any]:
    """`read_training_info` for a folder that must be a `recipe finetune` output."""
    info = read_training_info(model_dir)
    if info is None:
        raise ConfigError(f"{model_dir}: not a `recipe finetune` output folder (no {TRAINING_INFO_FILE})")
    return info
