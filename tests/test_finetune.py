"""`recipe finetune` on CPU with a tiny offline model: loss, label mask, stopping, adapter/merged agreement, resume,
8-bit loading and its fallback, config precedence, and the errors users get before any training starts.

One overfitting run is shared by the module (4 distinct rows x 6, 6 epochs): it must reproduce each training row's
completion exactly and stop. Offline: conftest.py sets HF_HUB_OFFLINE and friends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from finetune_rows import example_rows, rows_with_distinct_starts
from tiny_model import CPU_FINETUNE_SETTINGS, build_tiny_model, write_cpu_finetune_config

from recipe.cli import build_parser, main
from recipe.errors import ConfigError, InputError, RecipeError
from recipe.finetune.config import FinetuneConfig

REPO = Path(__file__).resolve().parent.parent
OVERFIT_ROWS = rows_with_distinct_starts(example_rows())  # four rows whose completions differ from the first token on
REPEATS = 6
EPOCHS = 6
END_TOKEN = "<|im_end|>"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def as_messages(row: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    }


def run_cli(*argv: str) -> int:
    return main(["finetune", *argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return example_rows()


@pytest.fixture(scope="module")
def train_rows(rows) -> list[dict]:
    return [rows[index] for index in OVERFIT_ROWS] * REPEATS


@pytest.fixture(scope="module")
def splits(tmp_path_factory, rows, train_rows) -> Path:
    """An ft_splits folder as prepare-data writes it, with its dataset_info.json."""
    folder = tmp_path_factory.mktemp("ft_splits")
    write_jsonl(folder / "train.jsonl", train_rows)
    write_jsonl(folder / "val.jsonl", [row for i, row in enumerate(rows) if i not in OVERFIT_ROWS][:6])
    template = "{{ rendered by tests/finetune_rows.py }}"
    info = {
        "prompt_template": "prompts/test_rows.jinja2",
        "prompt_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "prompt_template_text": template,
        "command_syntax": "v2",
        "output_format": "instruction",
        "num_train_rows": len(train_rows),
        "num_val_rows": 6,
        "seed": 7,
        "recipe_version": "0.1.0",
    }
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cpu_config(tmp_path_factory) -> Path:
    return write_cpu_finetune_config(tmp_path_factory.mktemp("config") / "cpu.yaml", num_train_epochs=float(EPOCHS))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, splits, cpu_config) -> Path:
    """The shared overfitting run, through the CLI, with the merged model."""
    out = tmp_path_factory.mktemp("runs") / "cmdgen"
    code = run_cli("--config", str(cpu_config), "--data", str(splits), "--model", str(tiny), "-o", str(out), "--merge")
    assert code == 0
    return out


def training_info(out: Path) -> dict:
    return json.loads((out / "recipe_training_info.json").read_text(encoding="utf-8"))


def cpu_finetune_config(tiny: Path, data: Path, out: Path, **changes) -> FinetuneConfig:
    values = {"model": str(tiny), "data": str(data), "output_dir": str(out)} | changes
    return FinetuneConfig.from_sources(None, CPU_FINETUNE_SETTINGS | values)


# ----------------------------------------------------------------------------------------------- training run


def test_train_loss_falls_and_val_is_evaluated_every_epoch(trained):
    log = json.loads((trained / "training_log.json").read_text())
    train_losses = [entry["loss"] for entry in log if "loss" in entry]
    eval_epochs = [entry["epoch"] for entry in log if "eval_loss" in entry]
    assert train_losses[-1] < train_losses[0] / 10
    assert eval_epochs == [float(epoch) for epoch in range(1, EPOCHS + 1)]


def test_overfit_model_generates_the_exact_completion_and_stops(trained, rows):
    from recipe.finetune import load_finetuned

    finetuned = load_finetuned(trained)
    prompts = [rows[index]["prompt"] for index in OVERFIT_ROWS]
    generated = finetuned.generate_ids(prompts, max_new_tokens=48)
    end_id = finetuned.tokenizer.convert_tokens_to_ids(END_TOKEN)
    for ids, index in zip(generated, OVERFIT_ROWS):
        assert ids[-1] == end_id, "the model must stop with the end token"
        assert finetuned.decode(ids) == rows[index]["completion"]


def test_merged_model_and_adapter_give_the_same_greedy_output(trained, rows):
    from recipe.finetune import generate_completions

    prompts = [row["prompt"] for row in rows[:16]]  # training and unseen prompts
    with_adapter = generate_completions(trained, prompts, max_new_tokens=32)
    merged = generate_completions(trained, prompts, max_new_tokens=32, merged=True)
    assert merged == with_adapter
    assert [with_adapter[i] for i in OVERFIT_ROWS[:2]] == [rows[i]["completion"] for i in OVERFIT_ROWS[:2]]


def test_adapter_reloads_onto_the_base_with_its_trained_weights(trained, tiny, rows):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny.resolve())
    saved = load_file(trained / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(trained))
    state = reloaded.state_dict()
    lora_b = [name for name in saved if "lora_B" in name]
    assert lora_b and all(saved[name].abs().sum() > 0 for name in lora_b), "lora_B starts at zero; trained is not"
    for name, tensor in saved.items():
        loaded = next(value for key, value in state.items() if key.replace(".default", "") == name)
        assert torch.equal(loaded, tensor)


def test_outputs_card_and_training_info(trained, splits, tiny):
    info = training_info(trained)
    dataset_info = json.loads((splits / "dataset_info.json").read_text())
    for key, value in dataset_info.items():
        assert info[key] == value  # copied as is: the runtime reads prompt_template_sha256 and command_syntax
    training = info["training"]
    assert training["base_model"] == str(tiny.resolve())
    assert (training["backend"], training["quantization"], training["prompt_format"]) == ("hf", "none", "chat")
    assert training["end_token"] == END_TOKEN
    assert training["data"]["train"]["rows"] == dataset_info["num_train_rows"]
    assert None not in (
        training["final_losses"]["train_last"],
        training["final_losses"]["train_run_mean"],
        training["final_losses"]["val"],
    )
    assert training["throughput"]["tokens_per_second"] > 0
    assert 0 <= training["throughput"]["padding_share"] < 1
    assert {"torch", "transformers", "trl", "peft"} <= training["versions"].keys()

    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "checkpoints",
    ):
        assert (trained / name).exists(), name
    assert (trained / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (trained / "training_log.csv").read_text().splitlines()
    assert csv_lines[0] == "step,epoch,train_loss,eval_loss,learning_rate,grad_norm"
    assert len(csv_lines) - 1 == max(entry["step"] for entry in json.loads((trained / "training_log.json").read_text()))

    card = (trained / "README.md").read_text()
    for fact in (
        dataset_info["prompt_template_sha256"],
        dataset_info["prompt_template_text"],
        "| command syntax | v2 |",
        "| LoRA r / alpha / dropout | 16 / 16 / 0.0 |",
        "| train rows | 24 |",
        "trl",
        "--max-lora-rank 16",
    ):
        assert fact in card, fact


def test_max_length_is_the_longest_row(trained):
    from transformers import AutoTokenizer

    from recipe.finetune import data

    training = training_info(trained)["training"]
    tokenizer = AutoTokenizer.from_pretrained(trained)
    examples = data.read_examples(Path(training["data"]["train_file"])) + data.read_examples(
        Path(training["data"]["val_file"])
    )
    prompt_format = data.PromptFormat("chat", END_TOKEN)
    longest = max(len(row.input_ids) for row in data.encode_examples(tokenizer, examples, prompt_format))
    assert training["max_length"] == longest


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path, cpu_config):
    copy = tmp_path / "resumed"
    shutil.copytree(trained, copy)
    before = training_info(copy)["training"]
    assert (
        run_cli(
            "--config",
            str(cpu_config),
            "--data",
            before["data"]["train_file"],
            before["data"]["val_file"],
            "--model",
            before["base_model"],
            "-o",
            str(copy),
            "--resume",
            "--epochs",
            str(EPOCHS + 1),
        )
        == 0
    )
    after = training_info(copy)["training"]
    # One more epoch was trained, not seven: exactly one pass over the training tokens.
    assert after["throughput"]["train_tokens"] == before["data"]["train"]["total_tokens"]
    log = json.loads((copy / "training_log.json").read_text())
    steps = [entry["step"] for entry in log if "loss" in entry]
    steps_per_epoch = before["data"]["train"]["rows"] // before["hyperparameters"]["per_device_train_batch_size"]
    assert steps == list(range(1, steps_per_epoch * (EPOCHS + 1) + 1))


def test_resume_without_a_checkpoint_is_a_user_error(tiny, splits, cpu_config, tmp_path, capsys):
    assert (
        run_cli(
            "--config",
            str(cpu_config),
            "--data",
            str(splits),
            "--model",
            str(tiny),
            "-o",
            str(tmp_path / "new"),
            "--resume",
        )
        == 2
    )
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ label mask


@pytest.mark.parametrize("row_format", ["instruction", "messages", "raw"])
def test_label_mask_covers_exactly_the_completion_and_end_token(row_format, rows, tmp_path, tiny):
    """What TRL trains on, read back from the trainer's dataset and a collated batch."""
    from recipe.finetune.train import prepare

    sample = rows[:6]
    data_rows = [as_messages(row) for row in sample] if row_format == "messages" else sample
    model_dir = build_tiny_model(tmp_path / "raw", with_chat_template=False) if row_format == "raw" else tiny
    data_file = write_jsonl(tmp_path / "data" / "train.jsonl", data_rows)
    run = prepare(cpu_finetune_config(model_dir, data_file, tmp_path / "out", group_by_length=False))
    assert run.prompt_format.kind == ("raw" if row_format == "raw" else "chat")
    tokenizer = run.tokenizer
    dataset = run.trainer.train_dataset
    assert len(dataset) == len(sample)
    expected = sorted(row["completion"] + tokenizer.eos_token for row in sample)  # eos is <|im_end|> in both
    decoded = []
    for example in dataset:
        labels = example["labels"]
        trained_positions = [i for i, label in enumerate(labels) if label != -100]
        # one block at the very end: the prompt is never trained, nothing follows the end token
        assert trained_positions == list(range(len(labels) - len(trained_positions), len(labels)))
        assert [labels[i] for i in trained_positions] == example["input_ids"][-len(trained_positions) :]
        decoded.append(tokenizer.decode([labels[i] for i in trained_positions]))
    assert sorted(decoded) == expected

    batch = next(iter(run.trainer.get_train_dataloader()))
    padding = batch["attention_mask"] == 0
    assert padding.any(), "rows differ in length, so a batch has padding"
    assert (batch["labels"][padding] == -100).all()
    batch_decoded = [tokenizer.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert set(batch_decoded) <= set(expected)


def launch_with_stacks_on_hang(command: list[str], timeout_s: int) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; if it outlives timeout_s, SIGABRT the whole group so every Python
    process (PYTHONFAULTHANDLER) prints the stacks of its threads before dying: a hang says where it hangs."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        stderr += f"\n[test] the launch was still running after {timeout_s} s: stacks above\n"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def is_teardown_flake(finished: subprocess.CompletedProcess) -> bool:
    """An abort at exit, or a launch that hung after the main process had reported the finished training."""
    if "terminate called without an active exception" in finished.stderr:
        return True
    return "[test] the launch was still running" in finished.stderr and finished.stdout.count("finetuned ") == 1


def test_distributed_data_parallel_run_on_two_cpu_processes(tiny, rows, cpu_config, tmp_path):
    """The hf backend under a multi-process launcher (torchrun, which `accelerate launch` drives on GPUs): the rows
    are split between the processes and only the main process writes the outputs."""
    data_file = write_jsonl(tmp_path / "train.jsonl", rows[:8])
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "recipe",
        "finetune",
        "--config",
        str(cpu_config),
        "--data",
        str(data_file),
        "--model",
        str(tiny),
        "-o",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
    ]
    finished = launch_with_stacks_on_hang(command, timeout_s=240)
    if finished.returncode != 0 and is_teardown_flake(finished):
        # Seen about once in 30 runs on a loaded 2-core machine, always after training and the outputs were done: a
        # process aborted by its communication threads at exit, or a launch that never returned. One more launch
        # tells such a flake from a real failure; the first launch's Python stacks are kept as a warning.
        warnings.warn(f"multi-process teardown flake, relaunched; its end: {finished.stderr[-4000:]}", stacklevel=1)
        shutil.rmtree(out, ignore_errors=True)
        finished = launch_with_stacks_on_hang(command, timeout_s=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("finetuned ") == 1, "only the main process reports"
    training = training_info(out)["training"]
    assert training["hardware"]["processes"] == 2
    log = json.loads((out / "training_log.json").read_text())
    assert max(entry["step"] for entry in log) == 8 // (2 * 2)  # 8 rows, 2 processes x batch 2
    assert (out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- quantization


def test_8bit_bitsandbytes_load_and_lora_training_on_cpu(tiny, splits, cpu_config, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "int8"
    assert (
        run_cli(
            "--config",
            str(cpu_config),
            "--data",
            str(splits),
            "--model",
            str(tiny),
            "-o",
            str(out),
            "--load-in-8bit",
            "--epochs",
            "1",
        )
        == 0
    )
    training = training_info(out)["training"]
    assert training["quantization"] == "8bit"
    assert training["quantization_check"].startswith("14 of 14 LoRA target layers are Linear8bitLt")
    log = json.loads((out / "training_log.json").read_text())
    assert all(entry["loss"] == entry["loss"] for entry in log if "loss" in entry)  # no NaN


def test_ignored_8bit_flag_is_detected_and_falls_back(tiny, splits, tmp_path, monkeypatch, caplog):
    """A load that silently stays 16/32-bit (as Unsloth's 8-bit flag once did) must not pass as 8-bit."""
    pytest.importorskip("bitsandbytes")
    import torch

    from recipe.finetune import model

    real_bnb_config = model.bnb_config
    monkeypatch.setattr(model, "bnb_config", lambda q, dtype: None if q == "8bit" else real_bnb_config(q, dtype))
    config = cpu_finetune_config(tiny, splits, tmp_path / "out", quantization="8bit", quantization_fallback="4bit")
    base = model.load_base_model(config, "hf", torch.float32, max_length=2048)
    assert base.quantization == "4bit" and base.check.ok
    assert "8bit loading did not happen: 0 of 14 LoRA target layers are Linear8bitLt" in caplog.text

    strict = cpu_finetune_config(tiny, splits, tmp_path / "out", quantization="8bit", quantization_fallback="error")
    with pytest.raises(RecipeError, match="8bit loading did not happen"):
        model.load_base_model(strict, "hf", torch.float32, max_length=2048)


# ------------------------------------------------------------------------------------ errors before training


def test_a_row_longer_than_max_length_is_an_error_naming_it(tiny, splits, cpu_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        run_cli(
            "--config",
            str(cpu_config),
            "--data",
            str(splits),
            "--model",
            str(tiny),
            "-o",
            str(out),
            "--max-length",
            "40",
        )
        == 2
    )  # shorter than every row
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"{splits / 'train.jsonl'}:1: row is ")
    assert "longer than max_length 40" in error and "more rows are too long" in error
    assert not (out / "checkpoints").exists()


def test_malformed_row_is_an_error_at_its_line(tiny, tmp_path, cpu_config, capsys, rows):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p", "completion": ""}) + "\n")
    assert (
        run_cli(
            "--config", str(cpu_config), "--data", str(data_file), "--model", str(tiny), "-o", str(tmp_path / "out")
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == f"{data_file}:2: empty completion: nothing to learn"


def test_output_folder_with_files_is_refused(tiny, splits, cpu_config, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("--config", str(cpu_config), "--data", str(splits), "--model", str(tiny), "-o", str(out)) == 2
    assert "not empty" in capsys.readouterr().err


def test_unsloth_backend_without_a_gpu_is_a_clear_error(tiny, splits, cpu_config, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert (
        run_cli(
            "--config",
            str(cpu_config),
            "--data",
            str(splits),
            "--model",
            str(tiny),
            "-o",
            str(tmp_path / "out"),
            "--backend",
            "unsloth",
        )
        == 2
    )
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_remote_output_without_the_cloud_extra_fails_before_training(tiny, splits, cpu_config, capsys):
    try:
        metadata.version("gcsfs")
        pytest.skip("gcsfs is installed: this would reach the network")
    except metadata.PackageNotFoundError:
        pass
    assert (
        run_cli("--config", str(cpu_config), "--data", str(splits), "--model", str(tiny), "-o", "gs://bucket/cmdgen")
        == 2
    )
    assert "gcsfs" in capsys.readouterr().err


def test_upload_and_download_through_fsspec(tmp_path):
    from recipe.finetune import upload

    local = tmp_path / "out"
    (local / "merged").mkdir(parents=True)
    (local / "checkpoints").mkdir()
    (local / "adapter_config.json").write_text("{}")
    (local / "merged" / "config.json").write_text("{}")
    (local / "checkpoints" / "optimizer.pt").write_text("big")
    written = upload.upload_directory(local, "memory://bucket/run", exclude=("checkpoints",))
    assert sorted(written) == ["memory://bucket/run/adapter_config.json", "memory://bucket/run/merged/config.json"]
    fetched = upload.download_directory("memory://bucket/run", tmp_path / "back", ("adapter_config.json", "val.jsonl"))
    assert sorted(path.name for path in fetched.iterdir()) == ["adapter_config.json"]


# ------------------------------------------------------------------------------------------------ config


def test_cli_flags_override_the_yaml_which_overrides_the_defaults(tmp_path):
    from recipe.cli.finetune import config_from_args

    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text("lora_r: 8\nlearning_rate: 1.0e-3\nmerge: true\n")
    args = build_parser().parse_args(
        [
            "finetune",
            "--config",
            str(yaml_path),
            "--data",
            "a.jsonl",
            "b.jsonl",
            "-o",
            "out",
            "--lora-r",
            "4",
            "--no-quantization",
            "--lora-target-modules",
            "q_proj",
            "v_proj",
            "--epochs",
            "2",
        ]
    )
    config = config_from_args(args)
    assert (config.lora_r, config.learning_rate, config.lora_alpha) == (4, 1e-3, FinetuneConfig().lora_alpha)
    assert (config.quantization, config.lora_target_modules, config.num_train_epochs) == (
        "none",
        ["q_proj", "v_proj"],
        2.0,
    )
    assert (config.data, config.val_data, config.output_dir, config.merge) == ("a.jsonl", "b.jsonl", "out", True)


def test_config_yaml_documents_exactly_the_built_in_defaults():
    path = REPO / "finetune" / "config.yaml"
    from_file = FinetuneConfig.from_sources(path, {"data": "d", "output_dir": "o"})
    assert from_file == FinetuneConfig(data="d", output_dir="o")
    keys = [line for line in path.read_text().splitlines() if line and not line.startswith((" ", "#"))]
    assert len(keys) == len(FinetuneConfig().to_dict())
    undocumented = [line for line in keys if "#" not in line and not line.endswith(":")]
    assert not undocumented


def test_config_mistakes_are_reported_at_their_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora_r: 8\nlearning_rat: 1.0e-3\n")
    with pytest.raises(
        InputError, match=r"bad.yaml:2: unknown config field 'learning_rat'; did you mean 'learning_rate'"
    ):
        FinetuneConfig.from_sources(path)
    path.write_text("lora_r: eight\n")
    with pytest.raises(InputError, match=r"bad.yaml:1: lora_r: expected an integer"):
        FinetuneConfig.from_sources(path)
    with pytest.raises(ConfigError, match="quantization: '3bit' is not one of"):
        FinetuneConfig.from_sources(None, {"data": "d", "output_dir": "o", "quantization": "3bit"})


# ----------------------------------------------------------------------------------------------- environment


def test_cli_module_does_not_import_torch():
    code = (
        "import sys; from recipe.cli import build_parser; build_parser(); "
        "sys.exit(bool({'torch', 'transformers', 'trl'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_cpu_environment_has_no_gpu_only_packages():
    """Unsloth, triton or CUDA builds break transformers on CPU (known-weaknesses B.1)."""
    names = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    assert not [name for name in names if name.startswith("nvidia") or name in {"triton", "unsloth", "unsloth_zoo"}]
    for package in ("torch", "torchvision"):
        if package in names:
            assert "+cu" not in metadata.version(package)


# ------------------------------------------------------------------------------------------------ QA fixes


def test_empty_val_file_trains_without_validation_with_one_warning(tiny, rows, cpu_config, tmp_path, capsys, caplog):
    splits = tmp_path / "ft_splits"  # prepare-data --train-frac 1: every row in train, val.jsonl empty
    write_jsonl(splits / "train.jsonl", [rows[index] for index in OVERFIT_ROWS])
    (splits / "val.jsonl").write_text("")
    out = tmp_path / "out"
    assert (
        run_cli(
            "--config", str(cpu_config), "--data", str(splits), "--model", str(tiny), "-o", str(out), "--epochs", "1"
        )
        == 0
    )
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelname == "WARNING" and "without validation" in record.getMessage()
    ]
    assert warnings == [f"{splits / 'val.jsonl'} is empty: training without validation"]
    # The final line names which train loss it is; without validation the val loss is n/a.
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("finetuned "))
    losses = training_info(out)["training"]["final_losses"]
    assert line.endswith(
        f"last train loss {losses['train_last']:.4f} (run mean {losses['train_run_mean']:.4f}), val loss n/a"
    )
    log = json.loads((out / "training_log.json").read_text())
    assert losses["train_run_mean"] == next(entry["train_loss"] for entry in log if "train_loss" in entry)
    assert losses["train_last"] == [entry["loss"] for entry in log if "loss" in entry][-1]
    assert losses["val"] is None and not any("eval_loss" in entry for entry in log)
    card = (out / "README.md").read_text()
    for fact in (
        f"| last logged train loss | {losses['train_last']:.4f} |",
        f"| mean train loss over the run | {losses['train_run_mean']:.4f} |",
        "| final val loss | none (no validation rows) |",
        "| val rows | none |",
    ):
        assert fact in card, fact


def test_missing_validation_warnings_say_what_is_missing(tmp_path):
    from recipe.finetune import data

    folder = tmp_path / "ft_splits"
    train = write_jsonl(folder / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    assert data.validation_warning(data.resolve_data_files(str(folder), None), 0) == (
        f"no val.jsonl in {folder}: training without validation"
    )
    assert data.validation_warning(data.resolve_data_files(str(train), None), 0) == (
        "no validation file given (--data TRAIN.jsonl VAL.jsonl): training without validation"
    )
    (folder / "val.jsonl").write_text("")
    # --data train.jsonl does not pick up the val.jsonl beside it: the warning says so instead of "no val.jsonl".
    assert data.validation_warning(data.resolve_data_files(str(train), None), 0) == (
        f"no validation file given ({folder / 'val.jsonl'} is not used: give it as the second --data path): "
        "training without validation"
    )
    files = data.resolve_data_files(str(train), str(folder / "val.jsonl"))
    assert data.read_examples(files.val, allow_empty=True) == []
    assert data.validation_warning(files, 0) == f"{folder / 'val.jsonl'} is empty: training without validation"
    with pytest.raises(InputError, match="no rows"):
        data.read_examples(files.val)  # train.jsonl (and evaluate's input) must still have rows


@pytest.mark.parametrize("model", ["/nope/model", "./nope", "../nope/model", "~/nope-model", "tests/nope"])
def test_a_model_path_that_does_not_exist_is_a_one_line_error(model, splits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # "tests/nope" looks like a path because tests/ exists
    out = tmp_path / "out"
    assert run_cli("--data", str(splits), "--model", model, "-o", str(out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"--model {model}: folder not found; expected a local model folder, a .gguf file or a hub id like "
        "meta-llama/Llama-3.1-8B-Instruct"
    )
    assert not out.exists()  # checked before the output folder, tokenizer or model
    for hub_id in ("meta-llama/Llama-3.1-8B-Instruct", "gpt2"):
        FinetuneConfig(data="d", output_dir="o", model=hub_id).validate()  # hub ids pass unchecked


def test_help_states_each_flag_default_or_that_it_is_required(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "-o DIR, --output-dir DIR output folder, or gs://... / s3://... to upload there (needs the [cloud] "
        "extra) (required, here or as output_dir: in --config; no default)" in help_text
    )
    finetune_parser = build_parser()._subparsers._group_actions[0].choices["finetune"]
    for action in finetune_parser._actions:
        if action.dest == "help":
            continue
        assert "(default: " in action.help or "(required" in action.help, action.option_strings
