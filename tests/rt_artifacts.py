"""Tiny "finetuned" model folders for the runtime, serve and evaluate tests and the benches, in a second.

    finetuned_folder(dir, template) -> Path

writes what `recipe finetune --merge` leaves behind, without the (minutes-long on CPU) training: the tiny base model
(`tiny_model.build_tiny_model`) in `dir/base`, a LoRA adapter with random, non-zero weights plus the tokenizer in
`dir/finetuned`, the merged model in `dir/finetuned/merged`, and `recipe_training_info.json` with the keys the
runtime reads (template text and sha256, command syntax, training prompt format and end token, base model). The
weights are untrained, so the model emits garbage: what the constrained-decoding tests need, and enough to check
that serving, the runtime and evaluation run the real loading and generation paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tiny_model import build_tiny_model

from recipe.prompt import PromptTemplate

END_TOKEN = "<|im_end|>"


def offline() -> None:
    """No hub: every model here is a local folder (known-weaknesses B.1)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


def finetuned_folder(
    directory: Path,
    template: PromptTemplate,
    *,
    syntax: str = "v2",
    merge: bool = True,
    include_date_time: bool = False,
) -> Path:
    """Build the folders described in the module docstring under `directory`; return the finetuned folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline()
    base_dir = build_tiny_model(directory / "base")
    out = directory / "finetuned"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter); make it change the outputs
                parameter.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if merge:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    info = {
        "prompt_template": template.path,
        "prompt_template_sha256": template.sha256,
        "prompt_template_text": template.text,
        "command_syntax": syntax,
        "output_format": "instruction",
        "include_date_time": include_date_time,
        "seed": 42,
        "training": {
            "base_model": str(base_dir.resolve()),
            "precision": "fp32",
            "quantization": "none",
            "prompt_format": "chat",
            "end_token": END_TOKEN,
            "max_length": 3000,
            "merged": merge,
        },
    }
    (out / "recipe_training_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out
