"""GGUF base models: a `.gguf` file (llama.cpp's format, in which small instruct models ship, also inside Python
packages) becomes a plain Hugging Face model folder once, and everything else (finetune, evaluate, serve) loads that.

transformers reads GGUF itself (`from_pretrained(..., gguf_file=...)`, with the `gguf` package) and dequantizes the
weights to float32; that takes tens of seconds even for a 135M model, so the result is saved once under
`~/.cache/recipe/gguf/<file stem>-<sha256 prefix>/` and reused. Two things the GGUF tokenizer gets wrong are fixed
on the way, both recorded in `recipe_gguf_source.json`:

* the end token: a llama.cpp conversion may name the *start* token as eos (SmolLM2: `eos_token` `<|im_start|>`),
  so a model would never be told to stop. The end token becomes the one the chat template closes an answer with
  (else the model config's eos);
* no pad token: the first of `<|endoftext|>`, `<|pad|>`, unk that is not the end token, else the end token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_FILE = "recipe_gguf_source.json"
PAD_CANDIDATES = ("<|endoftext|>", "<|pad|>", "<pad>", "<unk>")


def is_gguf(model: str | Path) -> bool:
    return str(model).lower().endswith(GGUF_SUFFIX)


def gguf_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "recipe" / "gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_gguf_model(model: str) -> str:
    """A `.gguf` file becomes its converted Hugging Face folder (converted on first use); anything else is returned
    as is."""
    if not is_gguf(model):
        return model
    path = Path(model).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--model {model}: GGUF file not found")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ConfigError(f"--model {model}: reading GGUF files needs the gguf package (pip install gguf)") from None
    sha256 = _sha256(path)
    folder = gguf_cache_dir() / f"{path.stem}-{sha256[:16]}"
    if (folder / SOURCE_FILE).is_file():
        return str(folder)
    log.info("converting %s to a Hugging Face folder in %s (once; dequantized to float32)", path, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: a run starting at the same time never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=f"{path.stem}.", dir=folder.parent))
    try:
        fixes = convert_gguf(path, staging)
        (staging / SOURCE_FILE).write_text(
            json.dumps({"gguf_file": str(path), "sha256": sha256, "fixes": fixes}, indent=2) + "\n", encoding="utf-8"
        )
        try:
            os.replace(staging, folder)
        except OSError:  # another run put it there first
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def convert_gguf(path: Path, out: Path) -> list[str]:
    """Load `path` through transformers' GGUF reader, fix the tokenizer, save model and tokenizer to `out`; returns
    what was fixed, one line each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path}: transformers cannot read this GGUF file: {text}") from None
    fixes = fix_tokenizer(tokenizer, model.config)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    _forget_gguf_quantization(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return fixes


def _forget_gguf_quantization(model: Any) -> None:
    """The weights are dequantized already, but transformers keeps its GGUF "quantizer" on the model and refuses to
    save it; without it the model is a plain float32 model, saved and loaded like any other."""
    model.hf_quantizer = None
    for name in ("quantization_config", "_is_quantized"):
        if name in vars(model.config):
            delattr(model.config, name)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: it then follows hf_quantizer
            pass


def chat_end_token(tokenizer: Any) -> str | None:
    """The special token the chat template closes an assistant answer with, or None (no template, or none found)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from recipe.finetune import data

    probe = data.Example(prompt=({"role": "user", "content": "hello"},), completion="cancel flow", path="", line=0)
    prompt_ids = data.encode_prompt(tokenizer, probe.prompt, "chat")
    full = data._render_chat(tokenizer, [*probe.prompt, {"role": "assistant", "content": probe.completion}])
    specials = data.special_token_ids(tokenizer)
    ends = [t for t in full[data._common_prefix(prompt_ids, full) :] if t in specials]
    return tokenizer.convert_ids_to_tokens(ends[0]) if ends else None


def fix_tokenizer(tokenizer: Any, config: Any) -> list[str]:
    """Set the end token the model really ends answers with, and a pad token; returns what changed."""
    fixes = []
    end = chat_end_token(tokenizer)
    if end is None and getattr(config, "eos_token_id", None) is not None:
        eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        end = tokenizer.convert_ids_to_tokens(eos_id)
    if end is not None and tokenizer.eos_token != end:
        fixes.append(f"eos token {tokenizer.eos_token!r} -> {end!r} (the token that ends an answer)")
        tokenizer.eos_token = end
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.bos_token:
        vocabulary = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocabulary and t != tokenizer.eos_token), tokenizer.eos_token)
        fixes.append(f"pad token {tokenizer.pad_token!r} -> {pad!r}")
        tokenizer.pad_token = pad
    return fixes
