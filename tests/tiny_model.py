"""A tiny, offline, deterministic causal LM that exercises the real finetuning and serving code paths on CPU.

API (stable; used by the finetune, serve and evaluate tests and by bench/):

    build_tiny_model(dir: Path, *, with_chat_template: bool = True) -> Path

It writes a Hugging Face model folder into `dir` (created if missing) and returns `dir`: a byte-level BPE tokenizer
(vocabulary 512, specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|pad|>`; eos = `<|im_end|>`,
pad = `<|pad|>`, no BOS) with the ChatML chat template carrying `{% generation %}` markers (saved as
`chat_template.jinja`), and a 2-layer Llama of ~100k parameters. Pass the folder wherever a hub id goes
(`--model`, `FinetuneConfig.model`). Same files on every call; no network; ~0.2 s.

`with_chat_template=False` leaves the template out, for the raw prompt/completion path.
See known-weaknesses B.3 for why the sizes are what they are (notably `initializer_range=0.2`).

    write_cpu_finetune_config(path: Path, **changes) -> Path

writes `CPU_FINETUNE_SETTINGS` (with `changes`) as a YAML config for `recipe finetune --config`: the settings under
which this model trains, and overfits a few rows, on CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

# The builder ships in the package (`recipe finetune --smoke` uses it); the tests use the same one.
from recipe.finetune.tiny import (
    CHATML_TEMPLATE,
    CPU_FINETUNE_SETTINGS,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tiny_model,
)

__all__ = [
    "CHATML_TEMPLATE",
    "CPU_FINETUNE_SETTINGS",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "build_tiny_model",
    "write_cpu_finetune_config",
]


def write_cpu_finetune_config(path: Path, **changes: object) -> Path:
    """`CPU_FINETUNE_SETTINGS` updated with `changes`, as YAML (JSON scalars are valid YAML) at `path`."""
    settings = CPU_FINETUNE_SETTINGS | changes
    Path(path).write_text(
        "".join(f"{name}: {json.dumps(value)}\n" for name, value in settings.items()), encoding="utf-8"
    )
    return Path(path)
