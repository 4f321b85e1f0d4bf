"""Benchmark: `recipe finetune` against a plain TRL SFT script on the same model, rows and hyperparameters.

Measures training throughput (non-padding tokens per second of training, evaluations excluded), the padding share
of the train batches, and how many tokens per row the loss covers. Both sides use the same measuring code
(`recipe.finetune.throughput`). recipe reduces padding by batching rows of similar length (`group_by_length`, its
default: transformers' LengthGroupedSampler, which sorts by length within mega-batches of up to 50 batches, at least
4 mega-batches per epoch, so it only helps from a few hundred rows on); it is also run with random batches, to
separate that effect from the rest. The machine should be otherwise idle: the load average is recorded.

    python bench/bench_finetune.py                       # tiny offline model on CPU (what BENCHMARKS.md records)
    python bench/bench_finetune.py --model meta-llama/Llama-3.1-8B-Instruct --data output/4_train_test_split/ft_splits \
        --quantization 8bit --batch-size 4 --grad-accum 2 --gradient-checkpointing --epochs 1 --repeats 1   # GPU

Prints a table and writes JSON (default bench/results/bench_finetune.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the library, and the tiny model and example rows of the tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


VARIANTS = {
    "recipe": "recipe finetune",
    "recipe-random": "recipe, random batches",
    "trl": "plain TRL",
    "trl-grouped": "plain TRL, group_by_length",
}  # the last: TRL's own length grouping, the fair baseline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local folder (default: the tiny offline test model)")
    parser.add_argument("--data", help="an ft_splits folder (default: the example rows of the tests, repeated)")
    parser.add_argument("--rows", type=int, default=256, help="training rows when --data is not given (default: 256)")
    parser.add_argument("--epochs", type=float, default=1, help="epochs per run (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation (default: 1)")
    parser.add_argument("--quantization", choices=["8bit", "4bit", "none"], default="none", help="(default: none)")
    parser.add_argument(
        "--backend", choices=["auto", "unsloth", "hf"], default="hf", help="recipe's backend (default: hf)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides (GPU runs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant; the median is reported (default: 3)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="which runs (default: all). With --backend unsloth run only `recipe` in that process: "
        "Unsloth patches TRL, so the plain TRL run would not be plain any more",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "bench_finetune.json")
    return parser.parse_args()


def example_splits(folder: Path, rows: int) -> Path:
    from finetune_rows import example_rows

    examples = example_rows()
    train = [examples[i % len(examples)] for i in range(rows)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train), encoding="utf-8")
    (folder / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in examples[:8]), encoding="utf-8")
    return folder


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters both sides use."""
    return {
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.03,
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "per_device_eval_batch_size": 8,
        "seed": 0,
        "gradient_checkpointing": args.gradient_checkpointing,
        "quantization": args.quantization,
        "logging_steps": 10,
    }


def run_recipe(args: argparse.Namespace, model: str, data: Path, out: Path, group_by_length: bool) -> dict[str, Any]:
    from recipe.finetune import FinetuneConfig
    from recipe.finetune.throughput import padding_share
    from recipe.finetune.train import prepare

    config = FinetuneConfig.from_sources(
        None,
        shared_settings(args)
        | {
            "model": model,
            "data": str(data),
            "output_dir": str(out),
            "backend": args.backend,
            "group_by_length": group_by_length,
            "save_checkpoints": False,
        },
    )
    reset_peak_gpu_memory()
    run = prepare(config)
    started = time.perf_counter()
    run.trainer.train()
    wall = time.perf_counter() - started
    labels = run.trainer.train_dataset["labels"]
    return {
        "tokens_per_second": run.speed.tokens_per_second,
        "train_tokens": run.speed.tokens,
        "train_seconds": run.speed.train_seconds,
        "wall_seconds": wall,
        "padding_share": padding_share(run.trainer),
        "loss_tokens_per_row": statistics.mean(sum(label != -100 for label in row) for row in labels),
        "peak_gpu_memory_gib": peak_gpu_memory_gib(),
        "backend": run.backend,
        "quantization": run.base.quantization,
        "max_length": run.max_length,
    }


def run_plain_trl(
    args: argparse.Namespace, model: str, data: Path, out: Path, max_length: int, group_by_length: bool = False
) -> dict[str, Any]:
    """What a user following TRL's docs writes: conversational prompt/completion rows, SFTTrainer with a LoRA config;
    with `group_by_length`, TRL's (transformers') own length-grouped sampler, one flag away for any TRL user."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from recipe.finetune.throughput import ThroughputCallback, padding_share

    def to_conversation(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
        return {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}],
        }

    files = {"train": str(data / "train.jsonl"), "validation": str(data / "val.jsonl")}
    dataset = load_dataset("json", data_files=files).map(to_conversation)
    settings = shared_settings(args)
    cuda = torch.cuda.is_available()
    model_kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if args.quantization != "none":
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=args.quantization == "8bit",
            load_in_4bit=args.quantization == "4bit",
            bnb_4bit_compute_dtype=model_kwargs["dtype"],
        )
        model_kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    speed = ThroughputCallback()
    reset_peak_gpu_memory()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out),
            num_train_epochs=settings["num_train_epochs"],
            per_device_train_batch_size=settings["per_device_train_batch_size"],
            per_device_eval_batch_size=settings["per_device_eval_batch_size"],
            gradient_accumulation_steps=settings["gradient_accumulation_steps"],
            learning_rate=settings["learning_rate"],
            lr_scheduler_type=settings["lr_scheduler_type"],
            warmup_steps=settings["warmup_ratio"],
            seed=0,
            max_length=max_length,
            model_init_kwargs=model_kwargs,
            bf16=cuda,
            use_cpu=not cuda,
            gradient_checkpointing=settings["gradient_checkpointing"],
            eval_strategy="epoch",
            save_strategy="no",
            logging_steps=10,
            report_to="none",
            include_num_input_tokens_seen="non_padding",
            train_sampling_strategy="group_by_length" if group_by_length else "random",
        ),
        train_dataset=dataset["train"],
        eval_dataset=dataset["validation"],
        peft_config=LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        callbacks=[speed],
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    labels = trainer.train_dataset["labels"]
    return {
        "tokens_per_second": speed.tokens_per_second,
        "train_tokens": speed.tokens,
        "train_seconds": speed.train_seconds,
        "wall_seconds": wall,
        "padding_share": padding_share(trainer),
        "loss_tokens_per_row": statistics.mean(sum(label != -100 for label in row) for row in labels),
        "peak_gpu_memory_gib": peak_gpu_memory_gib(),
    }


def longest_row(model: str, data: Path) -> int:
    """recipe's max_length rule (the longest row), for a TRL-only run."""
    from recipe.finetune import data as rows
    from recipe.finetune.model import load_tokenizer

    tokenizer = load_tokenizer(model)
    examples = rows.read_examples(data / "train.jsonl") + rows.read_examples(data / "val.jsonl")
    prompt_format = rows.choose_prompt_format(tokenizer, "auto", examples[0])
    return rows.resolve_max_length(None, examples, rows.encode_examples(tokenizer, examples, prompt_format))


def peak_gpu_memory_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = dict(runs[0])
    for key in ("tokens_per_second", "train_seconds", "wall_seconds", "padding_share"):
        summary[key] = statistics.median(run[key] for run in runs)
    summary["tokens_per_second_all"] = [round(run["tokens_per_second"]) for run in runs]
    # On a shared machine the fastest run is the one least disturbed by other work.
    summary["tokens_per_second_best"] = max(run["tokens_per_second"] for run in runs)
    return summary


def main() -> int:
    args = parse_args()
    load_at_start = os.getloadavg()
    import torch

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if args.model:
            model = args.model
        else:
            from tiny_model import build_tiny_model

            model = str(build_tiny_model(scratch / "tiny"))
        data = Path(args.data) if args.data else example_splits(scratch / "ft_splits", args.rows)
        results: dict[str, list[dict[str, Any]]] = {VARIANTS[variant]: [] for variant in args.variants}
        max_length = None
        for repeat in range(args.repeats):  # interleaved, so drift on the machine hits every variant alike
            for variant in args.variants:
                out = scratch / f"{variant}-{repeat}"
                if variant.startswith("trl"):
                    result = run_plain_trl(
                        args,
                        model,
                        data,
                        out,
                        max_length or longest_row(model, data),
                        group_by_length=variant == "trl-grouped",
                    )
                else:
                    result = run_recipe(args, model, data, out, group_by_length=variant == "recipe")
                    max_length = result["max_length"]
                results[VARIANTS[variant]].append(result)
        summary = {name: median_of(runs) for name, runs in results.items()}
        train_rows = sum(1 for line in (data / "train.jsonl").read_text().splitlines() if line.strip())

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model or "tiny offline Llama (tests/tiny_model.py)",
        "train_rows": train_rows,
        "settings": shared_settings(args),
        "load_average_at_start_and_end": [load_at_start, os.getloadavg()],  # other work on the machine skews timings
        "hardware": {
            "platform": platform.platform(),
            "cpu_cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch_threads": torch.get_num_threads(),
        },
        "results": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"{train_rows} rows x {args.epochs:g} epochs, batch {args.batch_size} x {args.grad_accum}, "
        f"{report['model']}, {report['hardware']['gpu'] if torch.cuda.is_available() else f'{os.cpu_count()} CPU cores'}, "
        f"median of {args.repeats}"
    )
    print(f"{'variant':<24} {'tokens/s median':>16} {'best':>7} {'padding':>8} {'loss tokens/row':>16} {'train s':>8}")
    for name, row in summary.items():
        print(
            f"{name:<24} {row['tokens_per_second']:>16.0f} {row['tokens_per_second_best']:>7.0f} "
            f"{row['padding_share']:>8.1%} {row['loss_tokens_per_row']:>16.1f} {row['train_seconds']:>8.1f}"
        )
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
