"""Greedy generation with a finetuned output folder, encoding prompts exactly as training did.

For checks next to training (the notebook's val exact match, the tests); serving is vLLM's job (finetune/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.artifacts import require_training_info
from recipe.finetune import data, model

Prompt = str | Sequence[dict[str, str]]  # a prompt string is one user message, as Rasa Pro sends it


@dataclass
class Finetuned:
    """A loaded finetuned model with the tokenizer and prompt format it was trained with."""

    model: Any
    tokenizer: Any
    prompt_format: data.PromptFormat

    @property
    def stop_ids(self) -> list[int]:
        """The end-of-answer token the model was trained to emit, and the tokenizer's eos in case they differ."""
        ids = [self.tokenizer.convert_tokens_to_ids(self.prompt_format.end_token)]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def encode(self, prompt: Prompt) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return data.encode_prompt(self.tokenizer, messages, self.prompt_format.kind, self.prompt_format.answer_prefix)

    def generate_ids(self, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int = 8) -> list[list[int]]:
        """New token ids per prompt, through the stop token where the model stopped (none where it ran out)."""
        import torch

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        results = []
        for start in range(0, len(prompts), batch_size):
            encoded = [self.encode(prompt) for prompt in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            # Left padding, so every row's answer starts right after its prompt.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=self.model.device)
            attention = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.model.device
            )
            with torch.no_grad():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=self.stop_ids,
                    pad_token_id=pad_id,
                )
            results += [self._until_stop(row[width:].tolist()) for row in output]
        return results

    def _until_stop(self, ids: list[int]) -> list[int]:
        for index, token_id in enumerate(ids):
            if token_id in self.stop_ids:
                return ids[: index + 1]
        return ids

    def decode(self, ids: list[int]) -> str:
        """The answer text, without the stop token."""
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_finetuned(model_dir: str | Path, merged: bool = False) -> Finetuned:
    """Load a `recipe finetune` output folder: base + adapter (as trained), or the merged model with `merged`."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    training = require_training_info(model_dir)["training"]
    loaded = model.load_trained_model(
        model_dir, training["base_model"], training["quantization"], model.torch_dtype(training["precision"]), merged
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Finetuned(loaded, tokenizer, data.PromptFormat(training["prompt_format"], training["end_token"]))


def generate_completions(
    model_dir: str | Path,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    *,
    merged: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers of a finetuned output folder to `prompts` (strings are single user messages)."""
    finetuned = load_finetuned(model_dir, merged)
    return [finetuned.decode(ids) for ids in finetuned.generate_ids(prompts, max_new_tokens, batch_size)]
