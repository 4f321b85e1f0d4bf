"""The finetuning recipe, top to bottom: read rows, tokenize, load and check the model, train with a val eval each
epoch, save the adapter (and the merged model), write the logs, curves and card, upload.

Module level imports stay free of torch/transformers: Unsloth, when chosen, must be imported before them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sized
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from recipe import __version__
from recipe.artifacts import (
    DATASET_INFO_FILE,
    MERGED_DIR,
    TRAIN_FILE,
    VAL_FILE,
    DatasetInfo,
    read_dataset_info,
    write_training_info,
)
from recipe.errors import ConfigError
from recipe.finetune import data, model, report, upload
from recipe.finetune.config import FinetuneConfig, resolved_lora_dropout
from recipe.finetune.gguf import resolve_gguf_model
from recipe.finetune.tiny import resolve_tiny_model

if TYPE_CHECKING:
    from trl import SFTTrainer

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_IN_PROGRESS = ".run_in_progress"  # in the output folder from the start of a run until its outputs are written
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth")


@dataclass
class FinetuneResult:
    """Where the trained model is and how the run went."""

    output_dir: str  # as given: a local folder, gs://... or s3://...
    local_dir: Path  # the files on this machine
    merged_dir: Path | None
    train_loss: float | None  # the last logged step's train loss
    eval_loss: float | None  # the last epoch's val loss; None without validation
    duration_s: float
    info: dict[str, Any]
    main_process: bool = True  # False on the other processes of a distributed run, which write nothing
    train_loss_mean: float | None = None  # the trainer's mean train loss over the run


@dataclass
class PreparedRun:
    """Everything up to the first training step, kept together so tests and the bench can inspect it."""

    config: FinetuneConfig  # with the model as an absolute path when it is a local folder
    local_dir: Path
    files: data.DataFiles
    dataset_info: DatasetInfo | None
    train_examples: list[data.Example]
    val_examples: list[data.Example]
    train_rows: list[data.Encoded]
    val_rows: list[data.Encoded]
    prompt_format: data.PromptFormat
    max_length: int
    backend: str
    precision: str
    base: model.BaseModel
    tokenizer: Any
    trainer: SFTTrainer | None
    speed: Any  # throughput.ThroughputCallback (that module imports transformers, so it is imported late)
    requested_model: str | None = None  # --model as given (a hub id, a folder, a .gguf file, recipe:tiny)

    def release_model(self) -> None:
        """Drop the trained model and trainer to free (GPU) memory, e.g. before merging."""
        self.trainer = None
        self.base = dataclasses.replace(self.base, model=None)
        model.release_memory()


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Train a LoRA adapter on prepare-data's rows as `config` says; see finetune/README.md."""
    started = time.monotonic()
    run = prepare(config)
    trainer = run.trainer
    assert trainer is not None and config.output_dir is not None  # prepare() validated the config, built the trainer
    if trainer.is_world_process_zero():  # from the first step until the outputs are written: an interrupted run
        (run.local_dir / RUN_IN_PROGRESS).write_text("training; removed once the outputs are written\n")
    checkpoint = last_checkpoint(run.local_dir) if config.resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(run.local_dir))  # adapter + tokenizer; collective under FSDP, so every process calls it
    if not trainer.is_world_process_zero():
        end_distributed_run()  # waits for the main process to finish writing
        return FinetuneResult(
            config.output_dir, run.local_dir, None, None, None, time.monotonic() - started, {}, main_process=False
        )
    (run.local_dir / "training_args.bin").unlink(missing_ok=True)  # pickled arguments: not portable, not needed
    loaded_as = record_adapter_base(run.local_dir, run.config.model)
    log_history = trainer.state.log_history
    from recipe.finetune.throughput import padding_share

    padding = padding_share(trainer)
    final_losses = final_loss_values(log_history, checkpoint_step(checkpoint))
    del trainer
    run.release_model()
    merged_dir = None
    if config.merge:
        merged_dir = run.local_dir / MERGED_DIR
        model.merge_adapter(
            run.config.model, run.local_dir, merged_dir, model.torch_dtype(run.precision), run.tokenizer
        )
    info = training_info(
        run,
        final_losses,
        padding,
        merged=merged_dir is not None,
        duration_s=time.monotonic() - started,
        loaded_as=loaded_as,
    )
    write_outputs(run.local_dir, info, log_history)
    (run.local_dir / RUN_IN_PROGRESS).unlink(missing_ok=True)
    if upload.is_remote(config.output_dir):
        upload.upload_directory(run.local_dir, config.output_dir, exclude=(CHECKPOINTS,))
    end_distributed_run()
    return FinetuneResult(
        config.output_dir,
        run.local_dir,
        merged_dir,
        final_losses["train_last"],
        final_losses["val"],
        info["training"]["duration_s"],
        info,
        train_loss_mean=final_losses["train_run_mean"],
    )


def end_distributed_run() -> None:
    """In a multi-process run, meet the other processes once more and tear the process group down: a process that
    exits with the group alive is aborted by its communication threads (`terminate called without an active
    exception`), which fails the launch although training succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare(config: FinetuneConfig) -> PreparedRun:
    """Validate, read and tokenize the data, load and check the model, add LoRA and build the trainer."""
    config.validate()
    local_dir = prepare_output_dir(config)
    files = fetch_data_files(config)
    train_examples = data.shortest(data.read_examples(files.train), config.max_train_rows)
    val_examples = (
        data.shortest(data.read_examples(files.val, allow_empty=True), config.max_val_rows) if files.val else []
    )
    without_val = data.validation_warning(files, len(val_examples))
    if without_val:
        log.warning(without_val)
    dataset_info = read_dataset_info(files.dataset_info) if files.dataset_info else None

    backend = model.resolve_backend(config.backend)
    config = dataclasses.replace(config, lora_dropout=resolved_lora_dropout(config.lora_dropout, backend))
    if backend == "unsloth":
        model.import_unsloth()  # before anything imports transformers, trl or peft
    from recipe.finetune.progress import quiet_library_bars

    quiet_library_bars()
    requested_model = config.model
    # recipe:tiny is built offline, a .gguf file converted once to a Hugging Face folder: both then load as folders
    config = dataclasses.replace(config, model=absolute_model_id(resolve_gguf_model(resolve_tiny_model(config.model))))
    tokenizer = model.load_tokenizer(config.model)
    prompt_format = data.choose_prompt_format(
        tokenizer, config.prompt_format, train_examples[0], config.template_answer_text
    )
    train_rows = data.encode_examples(tokenizer, train_examples, prompt_format)
    val_rows = data.encode_examples(tokenizer, val_examples, prompt_format)
    # Before the (slow) model load: a row that would be cut stops the run here.
    max_length = data.resolve_max_length(config.max_length, train_examples + val_examples, train_rows + val_rows)

    precision = model.resolve_precision(config.precision)
    slow = slow_setup_reason(config, backend)
    if slow:
        log.warning("%s; the expected time follows after the first step", slow)
    from transformers import set_seed

    from recipe.finetune.progress import LogLineCallback

    set_seed(config.seed)  # LoRA initialisation and dropout
    base = model.load_base_model(config, backend, model.torch_dtype(precision), max_length)
    if base.tokenizer is not None:
        tokenizer = base.tokenizer  # Unsloth's (it may set a pad token); same vocabulary as the rows were encoded with
    peft_model = model.add_lora(base, config, backend, max_length)
    from recipe.finetune import throughput

    speed = throughput.ThroughputCallback()
    trainer = build_trainer(
        config,
        peft_model,
        tokenizer,
        train_rows,
        val_rows,
        max_length,
        precision,
        local_dir / CHECKPOINTS,
        [speed],
        LogLineCallback(slow),
    )
    kept = len(cast(Sized, trainer.train_dataset))  # a datasets.Dataset, built from the rows
    if kept != len(train_rows):
        raise RuntimeError(f"the trainer kept {kept} of {len(train_rows)} training rows")
    return PreparedRun(
        config,
        local_dir,
        files,
        dataset_info,
        train_examples,
        val_examples,
        train_rows,
        val_rows,
        prompt_format,
        max_length,
        backend,
        precision,
        base,
        tokenizer,
        trainer,
        speed,
        requested_model=requested_model,
    )


def slow_setup_reason(config: FinetuneConfig, backend: str) -> str | None:
    """Why this run will be very slow, when it will: 8-bit on a CPU (bitsandbytes' int8 matmuls crawl there; a
    tiny model on 3,000-token rows was measured at 6 h 40 min)."""
    if config.quantization == "8bit" and not model.cuda_available():
        return (
            f"8-bit quantization on a CPU ({config.model}): bitsandbytes' int8 matmuls are very slow there; "
            "--no-quantization is faster where the 32-bit weights fit in memory"
        )
    return None


def sft_config(config: FinetuneConfig, max_length: int, precision: str, checkpoints_dir: Path, has_val: bool) -> Any:
    """TRL's arguments: ours, plus the settings that keep TRL's defaults from hurting (known-weaknesses B.2)."""
    from trl import SFTConfig

    from recipe.finetune.progress import on_a_terminal

    return SFTConfig(
        output_dir=str(checkpoints_dir),
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a share of the steps (warmup_ratio was removed)
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        max_length=max_length,  # every row fits (checked); TRL's default 1024 would cut Rasa prompts
        packing=False,
        completion_only_loss=True,  # labels from our completion_mask: the answer and its end token only
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        bf16=precision == "bf16",  # set both explicitly: SFTConfig defaults to bf16, which autocasts on CPU
        fp16=precision == "fp16",
        use_cpu=not model.cuda_available(),
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        eval_strategy="epoch" if has_val else "no",
        save_strategy="epoch" if config.save_checkpoints else "no",
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=not on_a_terminal(),  # a bar redrawn into a log file is noise; our LogLineCallback says it once
        ddp_find_unused_parameters=False,  # frozen base weights are not unused parameters
    )


def build_trainer(
    config: FinetuneConfig,
    peft_model: Any,
    tokenizer: Any,
    train_rows: list[data.Encoded],
    val_rows: list[data.Encoded],
    max_length: int,
    precision: str,
    checkpoints_dir: Path,
    callbacks: list[Any],
    line_callback: Any = None,
) -> SFTTrainer:
    from trl import SFTTrainer

    from recipe.finetune.progress import LogLineCallback, quiet_trainer_output

    trainer = SFTTrainer(
        model=peft_model,
        args=sft_config(config, max_length, precision, checkpoints_dir, has_val=bool(val_rows)),
        train_dataset=data.to_dataset(train_rows),
        eval_dataset=data.to_dataset(val_rows) if val_rows else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    quiet_trainer_output(trainer, line_callback or LogLineCallback())
    return trainer


def absolute_model_id(model_id: str) -> str:
    """A local folder becomes absolute: PEFT records it verbatim as the adapter's base model."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


def prepare_output_dir(config: FinetuneConfig) -> Path:
    """The local folder to train in; a fresh one unless resuming, and a writable remote target checked up front."""
    assert config.output_dir is not None  # config.validate() requires it
    if upload.is_remote(config.output_dir):
        upload.check_writable(config.output_dir)
        local_dir = upload.local_staging_dir(config.output_dir, "outputs")
    elif "://" in config.output_dir:
        raise ConfigError(f"{config.output_dir}: only local folders, gs:// and s3:// are supported")
    else:
        local_dir = Path(config.output_dir).expanduser()
    interrupted = (local_dir / RUN_IN_PROGRESS).exists()
    checkpoint = last_checkpoint(local_dir)
    if config.resume:
        if checkpoint is None and not interrupted:
            raise ConfigError(f"{local_dir}: --resume, but there is no checkpoint in {local_dir / CHECKPOINTS}")
        if checkpoint is None:
            # Interrupted before its first checkpoint: nothing to continue from, so the run starts again in place.
            log.warning("%s: the interrupted run saved no checkpoint; starting it again in place", local_dir)
    # Only the main process checks: in a distributed run the others may look after it has started writing.
    elif model.is_main_process() and interrupted:
        how = (
            f"--resume continues it from {Path(checkpoint).name}"
            if checkpoint is not None
            else "it saved no checkpoint; --resume starts it again in place"
        )
        raise ConfigError(f"{local_dir}: holds an interrupted run; {how} (or choose a new output folder)")
    elif model.is_main_process() and local_dir.exists() and any(local_dir.iterdir()):
        raise ConfigError(f"{local_dir}: output folder is not empty; choose a new one, or --resume a run there")
    local_dir.mkdir(parents=True, exist_ok=True)
    return local_dir


def last_checkpoint(local_dir: Path) -> str | None:
    checkpoints = local_dir / CHECKPOINTS
    if not checkpoints.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints))


def fetch_data_files(config: FinetuneConfig) -> data.DataFiles:
    """Local data as is; a gs:// or s3:// ft_splits folder is downloaded first."""
    assert config.data is not None  # config.validate() requires it
    if config.val_data and upload.is_remote(config.val_data):
        raise ConfigError(f"{config.val_data}: give a remote ft_splits folder as --data instead of remote files")
    if not upload.is_remote(config.data):
        return data.resolve_data_files(config.data, config.val_data)
    local = upload.download_directory(
        config.data,
        upload.local_staging_dir(config.data, "data"),
        (TRAIN_FILE, VAL_FILE, DATASET_INFO_FILE),
    )
    return data.resolve_data_files(str(local), config.val_data)


def checkpoint_step(checkpoint: str | None) -> int:
    """The global step a resumed run started from (`checkpoint-N`), 0 for a fresh run."""
    if checkpoint is None:
        return 0
    _, _, number = Path(checkpoint).name.rpartition("-")
    return int(number) if number.isdigit() else 0


def final_loss_values(log_history: list[dict[str, Any]], resumed_from_step: int = 0) -> dict[str, float | None]:
    """train_last: the last logged step's train loss; train_run_mean: the trainer's mean over this run's steps (its
    final `train_loss` entry); val: the last val evaluation. After --resume the trainer sums the losses of the steps
    run since the checkpoint but divides by every step, so its mean is scaled back to the steps it summed."""
    table = report.log_table(log_history)
    train = [row["train_loss"] for row in table if row["train_loss"] is not None]
    val = [row["eval_loss"] for row in table if row["eval_loss"] is not None]
    finals = [entry for entry in log_history if "train_loss" in entry]
    mean = finals[-1]["train_loss"] if finals else None
    if mean is not None and resumed_from_step:
        steps = int(finals[-1].get("step") or 0)
        mean = mean * steps / (steps - resumed_from_step) if steps > resumed_from_step else None
    return {"train_last": train[-1] if train else None, "train_run_mean": mean, "val": val[-1] if val else None}


def record_adapter_base(local_dir: Path, base_model: str) -> str | None:
    """The adapter names the base model the user asked for (a hub id, or the absolute folder): Unsloth loads a
    renamed copy (`unsloth/...-bnb-4bit`) and PEFT records that name, which would then be served instead. Returns
    the name it had when it differed."""
    path = local_dir / "adapter_config.json"
    if not path.is_file():
        return None
    adapter = json.loads(path.read_text(encoding="utf-8"))
    recorded = adapter.get("base_model_name_or_path")
    if recorded == base_model:
        return None
    adapter["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return recorded


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "recipe": __version__}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "processes": model.world_size(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        facts |= {
            "gpu": properties.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    else:
        facts["gpu"] = "none"
    return facts


def training_info(
    run: PreparedRun,
    final_losses: dict[str, float | None],
    padding: float,
    merged: bool,
    duration_s: float,
    loaded_as: str | None = None,
) -> dict[str, Any]:
    """prepare-data's dataset_info.json (its keys at the top, null when unknown) extended with the training facts."""
    # dataset_info.json's keys at the top, null when the data came without it
    info: dict[str, Any] = (run.dataset_info or DatasetInfo.from_mapping({})).as_dict()
    chat_template = getattr(run.tokenizer, "chat_template", None) if run.prompt_format.kind == "chat" else None
    info["output_dir"] = run.config.output_dir
    info["training"] = {
        "base_model": run.config.model,
        "base_model_requested": run.requested_model or run.config.model,  # as given: hub id, folder, .gguf, recipe:tiny
        "base_model_loaded_as": loaded_as,  # the name the backend loaded it under, where it differs (Unsloth)
        "backend": run.backend,
        "quantization": run.base.quantization,
        "quantization_check": run.base.check.describe(),
        "precision": run.precision,
        "prompt_format": run.prompt_format.kind,
        "chat_template_sha256": data.sha256_text(chat_template) if chat_template else None,
        "end_token": run.prompt_format.end_token,
        "answer_prefix": run.prompt_format.answer_prefix,  # the template's injected text, given in the prompt
        "max_length": run.max_length,
        "hyperparameters": run.config.to_dict(),
        "data": {
            "train_file": str(run.files.train),
            "val_file": str(run.files.val) if run.files.val else None,
            "dataset_info_file": str(run.files.dataset_info) if run.files.dataset_info else None,
            "train": data.token_stats(run.train_rows),
            "val": data.token_stats(run.val_rows) if run.val_rows else None,
            "commands": data.command_counts(run.train_examples),
        },
        "throughput": {
            "tokens_per_second": run.speed.tokens_per_second,
            "train_tokens": run.speed.tokens,
            "train_seconds": run.speed.train_seconds,
            "padding_share": padding,
            "peak_gpu_memory_gib": peak_gpu_memory_gib(),
        },
        "final_losses": final_losses,
        "merged": merged,
        "versions": package_versions(),
        "hardware": hardware(),
        "duration_s": duration_s,
        "command": " ".join(sys.argv),
    }
    return info


def peak_gpu_memory_gib() -> float | None:
    """The most GPU memory torch held during the run (None without CUDA)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def write_outputs(local_dir: Path, info: dict[str, Any], log_history: list[dict[str, Any]]) -> None:
    write_training_info(local_dir, info)
    report.write_logs(log_history, local_dir)
    report.plot_losses(
        log_history, local_dir / report.LOSS_PNG, title=f"{Path(info['training']['base_model']).name} + LoRA"
    )
    (local_dir / report.MODEL_CARD).write_text(
        report.model_card(info, vllm_commands(local_dir, info)), encoding="utf-8"
    )


def vllm_commands(local_dir: Path, info: dict[str, Any]) -> dict[str, str]:
    """What `recipe serve --print-vllm-command` (merged) and `... --vllm-adapter` (adapter) print for this folder."""
    from recipe.serve import format_command_line, vllm_serve_command

    commands = {
        "adapter": format_command_line(vllm_serve_command(local_dir, served_name=report.SERVED_NAME, merged=False))
    }
    if info["training"].get("merged"):
        commands["merged"] = format_command_line(
            vllm_serve_command(local_dir, served_name=report.SERVED_NAME, merged=True)
        )
    return commands
