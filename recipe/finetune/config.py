"""The finetuning configuration: one flat dataclass, loaded from YAML and overridden from the command line.

Precedence, lowest first: the dataclass defaults (which `finetune/config.yaml` repeats line by line, with comments),
a YAML file, then explicit overrides (CLI flags). Field names follow `transformers`/`trl` where a value is passed
straight through, so the names mean what users already know. Importing this module never imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from recipe.errors import ConfigError, InputError

Backend = Literal["auto", "unsloth", "hf"]
Quantization = Literal["8bit", "4bit", "none"]
QuantizationFallback = Literal["4bit", "none", "error"]
PromptFormat = Literal["auto", "chat", "raw"]
TemplateAnswerText = Literal["prompt", "train", "error"]  # text a chat template injects into answers
Precision = Literal["auto", "bf16", "fp16", "fp32"]
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
BACKENDS = typing.get_args(Backend)
QUANTIZATIONS = typing.get_args(Quantization)
QUANTIZATION_FALLBACKS = typing.get_args(QuantizationFallback)
PROMPT_FORMATS = typing.get_args(PromptFormat)
TEMPLATE_ANSWER_TEXTS = typing.get_args(TemplateAnswerText)
PRECISIONS = typing.get_args(Precision)
LR_SCHEDULERS = typing.get_args(LrScheduler)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `recipe finetune` needs; see `finetune/config.yaml` for what each field does."""

    # What to train, on what, and where the result goes.
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    data: str | None = None
    val_data: str | None = None
    output_dir: str | None = None
    backend: Backend = "auto"
    quantization: Quantization = "8bit"
    quantization_fallback: QuantizationFallback = "4bit"
    prompt_format: PromptFormat = "auto"
    template_answer_text: TemplateAnswerText = "prompt"
    # LoRA.
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float | None = None  # None: 0 on unsloth (its fast path), 0.05 on hf (`resolved_lora_dropout`)
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    # Optimisation.
    learning_rate: float = 2e-4
    lr_scheduler_type: LrScheduler = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 2
    per_device_eval_batch_size: int = 8
    max_length: int | None = None
    max_train_rows: int | None = None
    max_val_rows: int | None = None
    group_by_length: bool = True
    gradient_checkpointing: bool = True
    precision: Precision = "auto"
    seed: int = 42
    logging_steps: int = 5
    # Outputs.
    save_checkpoints: bool = True
    merge: bool = False
    resume: bool = False

    @classmethod
    def from_sources(
        cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> FinetuneConfig:
        """Defaults, then the YAML file (if any), then `overrides`; validated."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml_values(Path(yaml_path)))
        for name, value in (overrides or {}).items():
            values[name] = coerce_value(name, value, where=None)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError for a value that cannot work, before any model is loaded."""
        choices = {
            "backend": BACKENDS,
            "quantization": QUANTIZATIONS,
            "quantization_fallback": QUANTIZATION_FALLBACKS,
            "prompt_format": PROMPT_FORMATS,
            "template_answer_text": TEMPLATE_ANSWER_TEXTS,
            "precision": PRECISIONS,
            "lr_scheduler_type": LR_SCHEDULERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.data:
            raise ConfigError("data: no training data given (--data DIR, or --data TRAIN.jsonl [VAL.jsonl])")
        if not self.output_dir:
            raise ConfigError("output_dir: no output folder given (-o DIR, gs://... or s3://...)")
        check_model_path(self.model)
        positive = (
            "lora_r",
            "lora_alpha",
            "learning_rate",
            "num_train_epochs",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "per_device_eval_batch_size",
            "logging_steps",
            "max_grad_norm",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("max_train_rows", "max_val_rows"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive or null (every row), got {getattr(self, name)}")
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"max_length: must be positive or null (computed from the data), got {self.max_length}")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must not be negative, got {self.weight_decay}")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules: name at least one module, e.g. q_proj")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


HF_LORA_DROPOUT = 0.05


def resolved_lora_dropout(requested: float | None, backend: str) -> float:
    """The dropout a run uses: the one asked for, else 0 on Unsloth (any other value puts its LoRA layers on a slower
    path) and 0.05 on transformers + PEFT."""
    if requested is not None:
        return requested
    return 0.0 if backend == "unsloth" else HF_LORA_DROPOUT


def looks_like_path(value: str) -> bool:
    """A local path rather than a hub id: absolute, ./ ../ or ~, more than one "/", or under an existing folder."""
    if value.startswith(("/", "./", "../", "~", ".\\", "..\\")) or value in (".", "..") or "\\" in value:
        return True
    if value.count("/") > 1:
        return True  # hub ids are "name" or "owner/name"
    parent = Path(value).parent
    return parent != Path(".") and parent.exists()


def check_model_path(model: str) -> None:
    """A model that looks like a local path must be a folder, else the hub client answers with a confusing error."""
    if model == "recipe:tiny" or not looks_like_path(model):  # recipe:tiny: built offline (recipe/finetune/tiny.py)
        return
    path = Path(model).expanduser()
    if path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):  # a GGUF file: recipe/finetune/gguf.py
        return
    problem = "not a folder" if path.exists() else "folder not found"
    raise ConfigError(
        f"--model {model}: {problem}; expected a local model folder, a .gguf file or a hub id like "
        "meta-llama/Llama-3.1-8B-Instruct"
    )


def field_types() -> dict[str, Any]:
    """Resolved type hints of FinetuneConfig's fields (the annotations are strings under __future__.annotations)."""
    hints = typing.get_type_hints(FinetuneConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FinetuneConfig)}


def load_yaml_values(path: Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields; unknown keys and wrong types are errors at `path:line`."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        document = YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise InputError(path, mark.line + 1 if mark else None, f"invalid YAML: {error}") from error
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise InputError(path, 1, "expected a mapping of config fields")
    known = field_types()
    values = {}
    for key, value in document.items():
        line = cast(CommentedMap, document).lc.key(key)[0] + 1  # typ="rt" loads mappings as CommentedMap
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise InputError(path, line, f"unknown config field {key!r}{suggestion}")
        values[key] = coerce_value(key, value, where=(path, line))
    return values


def coerce_value(name: str, value: Any, where: tuple[Path, int] | None) -> Any:
    """Check `value` against the field's type, converting YAML/CLI scalars to plain Python values."""
    types_by_name = field_types()
    if name not in types_by_name:
        raise ConfigError(f"unknown config field {name!r}")
    expected = types_by_name[name]
    try:
        return _coerce(value, expected)
    except TypeError as error:
        message = f"{name}: {error}"
        if where is None:
            raise ConfigError(message) from None
        raise InputError(where[0], where[1], message) from None


def _coerce(value: Any, expected: Any) -> Any:
    args = typing.get_args(expected)
    if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner)
    if typing.get_origin(expected) is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise TypeError(f"expected a list of strings, got {value!r}")
        return [str(item) for item in value]
    if expected is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return bool(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if expected is str or typing.get_origin(expected) is Literal:  # a Literal's choices: checked by validate()
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported type {expected!r}")
