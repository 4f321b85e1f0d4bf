"""What a run records about itself, checked on CPU without training: the base model the user asked for (Unsloth
loads renamed copies), the LoRA dropout per backend, and the run mean of the train loss after --resume."""

from __future__ import annotations

import json

import pytest

from recipe.errors import ConfigError
from recipe.finetune.config import FinetuneConfig, resolved_lora_dropout
from recipe.finetune.train import (
    checkpoint_step,
    final_loss_values,
    record_adapter_base,
)


def test_lora_dropout_defaults_to_zero_on_unsloth_and_to_005_on_hf():
    assert FinetuneConfig().lora_dropout is None
    assert resolved_lora_dropout(None, "unsloth") == 0.0  # anything else is Unsloth's slow path
    assert resolved_lora_dropout(None, "hf") == 0.05
    assert resolved_lora_dropout(0.1, "unsloth") == 0.1  # asked for: kept
    with pytest.raises(ConfigError, match="lora_dropout"):
        FinetuneConfig(data="d", output_dir="o", model="gpt2", lora_dropout=1.5).validate()


def test_run_mean_after_resume_covers_the_steps_this_run_summed():
    # 10 steps; resumed at step 6: the trainer summed steps 7-10 (loss 1.0 each) and divided by 10, not 4.
    log = [
        {"loss": 2.0, "step": 5, "epoch": 0.5},
        {"loss": 1.0, "step": 10, "epoch": 1.0},
        {"train_loss": 0.4, "step": 10, "epoch": 1.0},
    ]
    assert final_loss_values(log)["train_run_mean"] == 0.4  # a fresh run: the trainer's own mean
    resumed = final_loss_values(log, resumed_from_step=6)
    assert resumed["train_run_mean"] == pytest.approx(1.0) and resumed["train_last"] == 1.0
    assert checkpoint_step("/runs/x/checkpoints/checkpoint-6") == 6 and checkpoint_step(None) == 0


def test_the_adapter_names_the_base_model_the_user_asked_for(tmp_path):
    config = {"base_model_name_or_path": "unsloth/meta-llama-3.1-8b-instruct-bnb-8bit", "r": 16}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert record_adapter_base(tmp_path, "meta-llama/Llama-3.1-8B-Instruct") == config["base_model_name_or_path"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved == {"base_model_name_or_path": "meta-llama/Llama-3.1-8B-Instruct", "r": 16}
    assert record_adapter_base(tmp_path, "meta-llama/Llama-3.1-8B-Instruct") is None  # already right: untouched
