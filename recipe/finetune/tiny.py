"""A tiny causal LM built offline in a second, for trying the whole path on a CPU (`recipe finetune --smoke`) and
for the tests.

    build_tiny_model(dir: Path, *, with_chat_template: bool = True) -> Path

writes a Hugging Face model folder into `dir` (created if missing) and returns `dir`: a byte-level BPE tokenizer
(vocabulary 512, specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|pad|>`; eos = `<|im_end|>`,
pad = `<|pad|>`, no BOS) with the ChatML chat template carrying `{% generation %}` markers (saved as
`chat_template.jinja`), and a 2-layer Llama of ~100k parameters. Same files on every call; no network.
`with_chat_template=False` leaves the template out, for the raw prompt/completion path. It learns the shape of the
answers, not their meaning: a smoke run proves the plumbing (train, save, reload, serve, evaluate), not quality.

`TINY_MODEL` (`recipe:tiny`) as the base model (`--model`, `model:` in a config) builds it into the cache
(`$XDG_CACHE_HOME/recipe/tiny-model`, else `~/.cache/recipe/tiny-model`) and trains on that folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL = "recipe:tiny"


def tiny_model_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "recipe" / "tiny-model"


def resolve_tiny_model(model: str) -> str:
    """`recipe:tiny` becomes the folder of the tiny model, built there first; any other model id is returned as is."""
    if model != TINY_MODEL:
        return model
    folder = tiny_model_cache_dir()
    if not (folder / "model.safetensors").is_file() or not (folder / "tokenizer.json").is_file():
        # Built beside and renamed into place: two runs starting at once never see half a model.
        staging = Path(tempfile.mkdtemp(prefix="tiny-model.", dir=folder.parent if folder.parent.exists() else None))
        build_tiny_model(staging)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another run put it there first, or another file system: copy
            shutil.copytree(staging, folder, dirs_exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML; the assistant's content and its end token sit inside {% generation %} so assistant-only masks work.
CHATML_TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}\n"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}\n"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

VOCAB_SIZE = 512

# FinetuneConfig fields for the tiny model on CPU: a large learning rate, no checkpointing, no dropout (B.3).
CPU_FINETUNE_SETTINGS = {
    "quantization": "none",
    "gradient_checkpointing": False,
    "learning_rate": 2e-2,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "lora_dropout": 0.0,
    "num_train_epochs": 6.0,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "seed": 0,
}

# `recipe finetune --smoke` (and finetune/cpu-smoke.yaml, which repeats it): the whole path on a CPU in minutes. The
# tiny model, the shortest rows only, no quantization, merged so `recipe serve` loads one folder.
SMOKE_SETTINGS: dict[str, object] = CPU_FINETUNE_SETTINGS | {
    "model": TINY_MODEL,
    "backend": "hf",
    "max_train_rows": 48,
    "max_val_rows": 8,
    "num_train_epochs": 3.0,
    "logging_steps": 4,
    "merge": True,
}


def _training_lines() -> list[str]:
    """A few hundred lines in the vocabulary of command-generator prompts, so common words become single tokens."""
    words = [
        "start",
        "flow",
        "set",
        "slot",
        "cancel",
        "flow",
        "disambiguate",
        "flows",
        "offtopic",
        "reply",
        "provide",
        "info",
        "skip",
        "question",
        "repeat",
        "message",
        "hand",
        "over",
        "cannot",
        "handle",
        "book_hotel",
        "rent_car",
        "book_flight",
        "check_booking",
        "hotel_city",
        "car_pickup_city",
        "flight_destination",
        "departure_date",
        "number_of_guests",
        "USER",
        "AI",
        "Your",
        "action",
        "list",
        "available",
        "flows",
        "current",
        "state",
        "conversation",
        "description",
        "slots",
        "name",
        "value",
        "undefined",
        "allowed_values",
        "true",
        "false",
        "Lisbon",
        "Paris",
        "Berlin",
        "Madrid",
        "Rome",
        "Tokyo",
        "I",
        "would",
        "like",
        "to",
        "book",
        "a",
        "hotel",
        "room",
        "in",
        "for",
        "two",
        "nights",
        "please",
        "the",
        "and",
        "a",
        "car",
        "at",
        "airport",
        "tomorrow",
    ]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]


def _build_tokenizer(with_chat_template: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None
    )
    if with_chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(dir: Path, *, with_chat_template: bool = True) -> Path:
    """Write the tiny tokenizer and Llama into `dir` and return `dir` (see the module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(with_chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Large init: with the default 0.02 the frozen tied head gives near-uniform logits and LoRA cannot overfit.
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    # Seed locally so the weights are the same on every call without touching the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir
