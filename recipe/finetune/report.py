"""What a run leaves behind for people: the training log (CSV and JSON), the loss curves (PNG) and the model card."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

LOG_CSV = "training_log.csv"
LOG_JSON = "training_log.json"
LOSS_PNG = "loss_curves.png"
MODEL_CARD = "README.md"
LOG_COLUMNS = ["step", "epoch", "train_loss", "eval_loss", "learning_rate", "grad_norm"]


def log_table(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step: the Trainer logs train and eval metrics as separate entries for the same step."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry or not ({"loss", "eval_loss"} & entry.keys()):
            continue  # the final summary entry (train_runtime, ...) has no per-step loss
        row = rows.setdefault(entry["step"], {column: None for column in LOG_COLUMNS} | {"step": entry["step"]})
        row["epoch"] = entry.get("epoch", row["epoch"])
        row["train_loss"] = entry.get("loss", row["train_loss"])
        row["eval_loss"] = entry.get("eval_loss", row["eval_loss"])
        row["learning_rate"] = entry.get("learning_rate", row["learning_rate"])
        row["grad_norm"] = entry.get("grad_norm", row["grad_norm"])
    return [rows[step] for step in sorted(rows)]


def write_logs(log_history: list[dict[str, Any]], directory: Path) -> None:
    """training_log.json keeps every entry the Trainer logged; training_log.csv is the per-step table."""
    (directory / LOG_JSON).write_text(json.dumps(log_history, indent=2) + "\n", encoding="utf-8")
    with (directory / LOG_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(log_table(log_history))


def plot_losses(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train loss per logged step and val loss per epoch, both against epochs."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training box; must precede pyplot
    import matplotlib.pyplot as plt

    table = log_table(log_history)
    train = [(row["epoch"], row["train_loss"]) for row in table if row["train_loss"] is not None]
    val = [(row["epoch"], row["eval_loss"]) for row in table if row["eval_loss"] is not None]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        axes.plot(*zip(*val), label="val loss", color="tab:orange", marker="o")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss (completion tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _or_unknown(value: Any) -> str:
    return "unknown" if value in (None, "") else str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    # A "|" in a value (tokens like <|im_end|>) would split the cell.
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {_or_unknown(value).replace('|', chr(92) + '|')} |" for name, value in rows]
    return "\n".join(lines)


def _loss(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


SERVED_NAME = "cmdgen"  # the model name the card's commands serve under


def model_card(info: dict[str, Any], vllm_commands: dict[str, str] | None = None) -> str:
    """README.md for the output folder: everything needed to serve the model on the prompts it was trained on.

    `vllm_commands` ("merged", "adapter") are what `recipe serve --print-vllm-command [--vllm-adapter]` prints for
    this folder, so the card and the tool never disagree."""
    training = info["training"]
    data = training["data"]
    hyper = training["hyperparameters"]
    name = Path(info.get("output_dir", "model")).name
    template_text = info.get("prompt_template_text")
    template_block = (
        f"\n<details><summary>prompt template text</summary>\n\n```jinja2\n{template_text}\n```\n</details>"
        if template_text
        else "\nPrompt template text: unknown (no dataset_info.json next to the data)."
    )
    losses = training["final_losses"]
    speed = training["throughput"]
    sections = [
        f"# {name}: a finetuned Rasa Pro command generator",
        f"LoRA adapter for `{training['base_model']}` trained by `recipe finetune` ({training['backend']} backend) on "
        f"{data['train']['rows']} rows of dialogue-test data to emit command-DSL lines "
        f"(syntax {_or_unknown(info.get('command_syntax'))}).",
        "## Prompt template and command syntax",
        "Serve this model only with the template it was trained on; the runtime compares the hash below with "
        "`prompt_template_sha256` in `recipe_training_info.json`.\n\n"
        + _table(
            [
                ("prompt template", info.get("prompt_template")),
                ("prompt template sha256", info.get("prompt_template_sha256")),
                ("command syntax", info.get("command_syntax")),
                ("row format of the data", info.get("output_format")),
                (
                    "prompt format in training",
                    f"{training['prompt_format']} "
                    + (
                        "(one user message through the tokenizer's chat template, as Rasa Pro calls chat completions)"
                        if training["prompt_format"] == "chat"
                        else "(raw prompt string: serve through /v1/completions)"
                    ),
                ),
                ("chat template sha256", training.get("chat_template_sha256")),
                ("end-of-answer token", training["end_token"]),
                (
                    "text the template injects before answers (given in the prompt, not trained)",
                    json.dumps(training["answer_prefix"]) if training.get("answer_prefix") else "none",
                ),
            ]
        )
        + "\n"
        + template_block,
        "## Data",
        _table(
            [
                ("train rows", data["train"]["rows"]),
                ("val rows", data["val"]["rows"] if data["val"] else "none"),
                ("train file", data["train_file"]),
                ("val file", data["val_file"]),
                ("prompt tokens (min / median / max)", _span(data["train"]["prompt_tokens"])),
                ("completion tokens incl. end token (min / median / max)", _span(data["train"]["completion_tokens"])),
                ("max_length", training["max_length"]),
                ("commands in train completions", ", ".join(f"{k}: {v}" for k, v in data["commands"].items())),
                ("data seed (prepare-data)", info.get("seed")),
                ("prepare-data version", info.get("recipe_version")),
            ]
        ),
        "## Training",
        _table(
            [
                ("backend", training["backend"]),
                ("quantization requested / used", f"{hyper['quantization']} / {training['quantization']}"),
                ("quantization check", training["quantization_check"]),
                ("precision", training["precision"]),
                ("LoRA r / alpha / dropout", f"{hyper['lora_r']} / {hyper['lora_alpha']} / {hyper['lora_dropout']}"),
                ("LoRA target modules", ", ".join(hyper["lora_target_modules"])),
                (
                    "learning rate / schedule / warmup",
                    f"{hyper['learning_rate']} / {hyper['lr_scheduler_type']} / {hyper['warmup_ratio']}",
                ),
                ("epochs", hyper["num_train_epochs"]),
                (
                    "batch size x gradient accumulation x processes",
                    f"{hyper['per_device_train_batch_size']} x {hyper['gradient_accumulation_steps']} x "
                    f"{training['hardware']['processes']}",
                ),
                ("length-grouped batches", hyper["group_by_length"]),
                ("seed", hyper["seed"]),
                ("last logged train loss", _loss(losses["train_last"])),
                ("mean train loss over the run", _loss(losses["train_run_mean"])),
                ("final val loss", _loss(losses["val"]) if losses["val"] is not None else "none (no validation rows)"),
                ("duration", f"{training['duration_s']:.0f} s"),
                ("train tokens / s (without padding)", f"{speed['tokens_per_second']:.0f}"),
                ("padding share of the train batches", f"{speed['padding_share']:.1%}"),
            ]
        ),
        "Loss curves: `loss_curves.png`; per-step log: `training_log.csv` (all entries: `training_log.json`).",
        "## Versions and hardware",
        _table(
            [(package, version) for package, version in training["versions"].items()]
            + [(key, value) for key, value in training["hardware"].items()]
        ),
        "## Use",
        "Files: the adapter (`adapter_model.safetensors`, `adapter_config.json`) and the tokenizer at the top level"
        + (", the merged model in `merged/`" if training["merged"] else "")
        + ".",
        _use_section(training, vllm_commands or {}),
    ]
    return "\n\n".join(sections) + "\n"


def _use_section(training: dict[str, Any], vllm_commands: dict[str, str]) -> str:
    folder = "<this folder>"
    lines = [
        "On a CPU or a small GPU:",
        "",
        "```bash",
        f"recipe serve --model {folder} --name {SERVED_NAME}",
        "```",
        "",
    ]
    for variant in ("merged", "adapter"):  # the merged model first: unmerged LoRA is slower per token
        if variant not in vllm_commands:
            continue
        which = "the merged model" if variant == "merged" else "the base model with the adapter"
        flag = " --vllm-adapter" if variant == "adapter" and "merged" in vllm_commands else ""
        printed = f"`recipe serve --model {folder} --name {SERVED_NAME} --print-vllm-command{flag}`"
        lines += [
            f"With vLLM, {which} ({printed} printed this on the training machine):",
            "",
            "```bash",
            vllm_commands[variant],
            "```",
            "",
        ]
    chat = training["prompt_format"] == "chat"
    lines += [
        "Then `recipe rasa-config --model <this folder> --model-name cmdgen --api-base http://HOST:8000/v1` prints "
        "the `endpoints.yml` model group (`provider: self-hosted`, `model: cmdgen`, `temperature: 0.0`"
        + ("" if chat else ", `use_chat_completions_endpoint: false` (raw prompts)")
        + ") and the `config.yml` generator with the `prompt_template` the model was trained with."
    ]
    return "\n".join(lines)


def _span(stats: dict[str, Any]) -> str:
    return f"{stats['min']} / {stats['median']} / {stats['max']}"
