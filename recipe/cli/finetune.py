"""`recipe finetune`: LoRA-finetune the command-generator LLM on prepare-data's rows.

Flags override the YAML config (`--config`), which overrides the built-in defaults (the same values as
finetune/config.yaml). The library, and with it torch, is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.finetune.config import (
    ALL_PROJECTIONS,
    BACKENDS,
    LR_SCHEDULERS,
    PROMPT_FORMATS,
    TEMPLATE_ANSWER_TEXTS,
    FinetuneConfig,
)

DEFAULTS = FinetuneConfig()

# CLI flag destination -> config field, where the flag is shorter than the field name.
FLAG_FIELDS = {
    "lr": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
}

EPILOG = """\
examples:
  recipe finetune --smoke --data output/4_train_test_split/ft_splits -o runs/smoke     # on a CPU, in minutes
  recipe finetune --config finetune/config.yaml --data output/4_train_test_split/ft_splits -o runs/cmdgen
  recipe finetune --data train.jsonl val.jsonl --model Qwen/Qwen2.5-1.5B-Instruct --no-quantization -o runs/qwen
  recipe finetune --data gs://bucket/ft_splits -o gs://bucket/models/cmdgen --merge
  accelerate launch --config_file finetune/accelerate/ddp.yaml -m recipe finetune --backend hf ...
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="LoRA-finetune a command-generator LLM on prepare-data's rows",
        description="Finetune a LoRA adapter on prepare-data's ft_splits (train.jsonl, val.jsonl). The loss covers "
        "only the completion and its end token; val loss is computed every epoch. Writes the adapter, tokenizer, "
        "logs, loss curves and a model card to -o. Flags override --config, which overrides the defaults shown.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Every flag defaults to "not given", so only what the user typed overrides the config file.
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", metavar="YAML", help="config file (default: built-in defaults, the same as finetune/config.yaml)"
    )
    parser.add_argument(
        "--smoke",
        action="store_const",
        const=True,
        help="try the whole path on a CPU in minutes: "
        "a tiny model built offline (recipe:tiny), the 48 shortest train and 8 shortest val rows, no "
        "quantization, merged; the settings of finetune/cpu-smoke.yaml. It proves the plumbing "
        "(train, save, serve, evaluate), not the quality (default: off)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="the ft_splits folder (train.jsonl, val.jsonl, "
        "dataset_info.json), or TRAIN.jsonl [VAL.jsonl]; local, gs:// or s3:// folder (required, "
        "here or as data: in --config; no default)",
    )
    parser.add_argument("--model", help=f"base model: hub id or local folder (default: {DEFAULTS.model})")
    parser.add_argument(
        "-o",
        "--output-dir",
        dest="output_dir",
        metavar="DIR",
        help="output folder, or gs://... / s3://... to upload there (needs the [cloud] extra) "
        "(required, here or as output_dir: in --config; no default)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="auto: Unsloth on one CUDA GPU with the [gpu] extra, "
        f"else transformers + PEFT + TRL (hf) (default: {DEFAULTS.backend})",
    )
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument(
        "--load-in-8bit",
        dest="quantization",
        action="store_const",
        const="8bit",
        help=f"load the base in 8 bits (bitsandbytes) (default: {DEFAULTS.quantization})",
    )
    quantization.add_argument(
        "--load-in-4bit",
        dest="quantization",
        action="store_const",
        const="4bit",
        help=f"load the base in 4 bits (nf4, QLoRA) (default: {DEFAULTS.quantization})",
    )
    quantization.add_argument(
        "--no-quantization",
        dest="quantization",
        action="store_const",
        const="none",
        help=f"load the base in 16 bits (32 on CPU) (default: {DEFAULTS.quantization})",
    )
    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        help="chat: the tokenizer's chat template (what "
        "Rasa Pro's chat-completions call gets); raw: prompt string + completion + eos; auto: chat "
        f"when the tokenizer has a template (default: {DEFAULTS.prompt_format})",
    )
    parser.add_argument(
        "--template-answer-text",
        choices=TEMPLATE_ANSWER_TEXTS,
        help="text the chat template writes into every answer (a Qwen3-style empty <think> block): "
        "prompt: give it in the prompt, train only the commands; train: train it too; error: "
        f"stop (default: {DEFAULTS.template_answer_text})",
    )
    parser.add_argument("--lora-r", type=int, help=f"LoRA rank (default: {DEFAULTS.lora_r})")
    parser.add_argument(
        "--lora-alpha", type=int, help=f"LoRA alpha; the update is scaled by alpha/r (default: {DEFAULTS.lora_alpha})"
    )
    parser.add_argument(
        "--lora-dropout",
        type=float,
        help="dropout on the LoRA input (default: 0 on unsloth, whose fast path needs it, 0.05 on hf)",
    )
    parser.add_argument(
        "--lora-target-modules",
        nargs="+",
        metavar="NAME",
        help=f"layers that get adapters (default: {' '.join(ALL_PROJECTIONS)})",
    )
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: {DEFAULTS.learning_rate})")
    parser.add_argument(
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        help=f"learning-rate schedule after warmup (default: {DEFAULTS.lr_scheduler_type})",
    )
    parser.add_argument(
        "--warmup-ratio", type=float, help=f"share of the steps spent warming up (default: {DEFAULTS.warmup_ratio})"
    )
    parser.add_argument(
        "--epochs", type=float, help=f"passes over the training rows (default: {DEFAULTS.num_train_epochs:g})"
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"rows per device per step (default: {DEFAULTS.per_device_train_batch_size})"
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        help="steps whose gradients add up to one update; effective batch "
        f"= batch size x this x GPUs (default: {DEFAULTS.gradient_accumulation_steps})",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        help="longest row in tokens (default: the longest row of the data; a longer row is an error, never cut)",
    )
    parser.add_argument(
        "--seed", type=int, help=f"seed for LoRA init, dropout and batch order (default: {DEFAULTS.seed})"
    )
    parser.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        help="also save the base with the adapter merged in, to merged/ (default: off)",
    )
    parser.add_argument(
        "--resume",
        action="store_const",
        const=True,
        help="continue from the last checkpoint in "
        "-o (e.g. after an interruption, or with more --epochs) (default: off)",
    )
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The config file (or defaults) with every flag the user gave applied on top."""
    given = {key: value for key, value in vars(args).items() if key not in ("config", "run", "command", "smoke")}
    overrides = {FLAG_FIELDS.get(key, key): value for key, value in given.items()}
    if getattr(args, "smoke", False):
        if getattr(args, "config", None):
            raise ConfigError("--smoke and --config: choose one (--smoke is finetune/cpu-smoke.yaml's settings)")
        from recipe.finetune.tiny import SMOKE_SETTINGS

        overrides = dict(SMOKE_SETTINGS) | overrides
    if "data" in overrides:
        paths = overrides.pop("data")
        if len(paths) > 2:
            raise ConfigError("--data takes a folder, or a train file and a val file")
        overrides["data"] = paths[0]
        overrides["val_data"] = paths[1] if len(paths) == 2 else None
    return FinetuneConfig.from_sources(getattr(args, "config", None), overrides)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from recipe.finetune import finetune

    try:
        result = finetune(config)
    except KeyboardInterrupt:
        print(_interrupted(config), file=sys.stderr)
        return 130
    if not result.main_process:
        return 0  # under accelerate launch / torchrun, the main process reports
    print(
        f"finetuned {result.info.get('training', {}).get('base_model', config.model)} in {result.duration_s:.0f} s: "
        f"last train loss {_loss(result.train_loss)} (run mean {_loss(result.train_loss_mean)}), "
        f"val loss {_loss(result.eval_loss)}"
    )
    remote = result.output_dir != str(result.local_dir) and "://" in result.output_dir
    print(f"output: {result.output_dir}" + (f" (local copy: {result.local_dir})" if remote else ""))
    return 0


def _interrupted(config) -> str:
    """What an interrupted finetune left, and the command that goes on from there."""
    from recipe.finetune.train import last_checkpoint

    if "://" in config.output_dir:
        return (
            "interrupted: nothing was uploaded; run the same command with --resume to continue from the last "
            "checkpoint of the local copy, if one was saved"
        )
    checkpoint = last_checkpoint(Path(config.output_dir).expanduser())
    if checkpoint is None:
        return (
            f"interrupted: no checkpoint was saved yet in {config.output_dir} (one is saved per epoch); run the "
            "same command with --resume to start again in place"
        )
    return f"interrupted: the last checkpoint is {checkpoint}; run the same command with --resume to continue from it"


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
