"""Chat templates that write text into the assistant turn (a Qwen3-style template's empty `<think>` block before
every answer): detected by rendering a probe, and by default moved into the prompt, so the loss covers the DSL
lines only and the model's answers parse. The template below is written for this test in the shape of Qwen3's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from finetune_rows import example_rows, rows_with_distinct_starts
from tiny_model import build_tiny_model, write_cpu_finetune_config

from recipe.cli import main
from recipe.errors import ConfigError
from recipe.finetune import data
from recipe.finetune.model import load_tokenizer

THINK = "<think>\n\n</think>\n\n"
# ChatML, and the last assistant answer (the one after the user's last message) gets an empty think block first.
THINKING_TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '" + THINK.replace("\n", "\\n") + "' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PROBE = data.Example(
    prompt=({"role": "user", "content": "book a hotel"},),
    completion="start flow book_hotel",
    path="train.jsonl",
    line=1,
)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory) -> Path:
    folder = build_tiny_model(tmp_path_factory.mktemp("thinking"))
    (folder / "chat_template.jinja").write_text(THINKING_TEMPLATE, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("chatml"))


def _trained_text(tokenizer, encoded: data.Encoded) -> str:
    ids = [t for t, m in zip(encoded.input_ids, encoded.completion_mask) if m]
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_probe_finds_the_injected_block_and_nothing_in_chatml(thinking_model, chatml_model):
    thinking = load_tokenizer(str(thinking_model))
    assert thinking.chat_template == THINKING_TEMPLATE
    assert data.template_injection(thinking, PROBE) == data.TemplateInjection(prefix=THINK, suffix="")
    assert data.template_injection(load_tokenizer(str(chatml_model)), PROBE) is None


def test_default_moves_the_block_into_the_prompt(thinking_model, caplog):
    tokenizer = load_tokenizer(str(thinking_model))
    with caplog.at_level("WARNING"):
        prompt_format = data.choose_prompt_format(tokenizer, "auto", PROBE)
    assert prompt_format == data.PromptFormat("chat", "<|im_end|>", answer_prefix=THINK)
    assert "<think>" in caplog.text and "enable_thinking" in caplog.text
    encoded = data.encode_example(tokenizer, PROBE, prompt_format)
    assert _trained_text(tokenizer, encoded) == "start flow book_hotel<|im_end|>"  # the DSL and the end token only
    prompt = tokenizer.decode(encoded.input_ids[: encoded.prompt_length], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n" + THINK)
    # generation sees the same prompt tokens
    assert data.encode_prompt(tokenizer, PROBE.prompt, "chat", THINK) == encoded.input_ids[: encoded.prompt_length]


def test_train_keeps_the_block_and_error_stops(thinking_model, caplog):
    tokenizer = load_tokenizer(str(thinking_model))
    with caplog.at_level("WARNING"):
        kept = data.choose_prompt_format(tokenizer, "auto", PROBE, template_answer_text="train")
    assert kept.answer_prefix == "" and "unparseable" in caplog.text
    assert _trained_text(tokenizer, data.encode_example(tokenizer, PROBE, kept)).startswith("<think>")
    with pytest.raises(ConfigError, match="template_answer_text"):
        data.choose_prompt_format(tokenizer, "auto", PROBE, template_answer_text="error")


def test_finetuned_through_a_thinking_template_answers_parseable_dsl(thinking_model, tmp_path):
    """Overfit four rows through the thinking template, then answer their prompts through the runtime's local
    backend: exactly the trained DSL, no think lines, stopped at the end token."""
    from recipe.backends import LocalModelBackend

    rows = example_rows()
    chosen = rows_with_distinct_starts(rows)
    splits = tmp_path / "ft_splits"
    splits.mkdir()
    (splits / "train.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen) * 6, encoding="utf-8")
    (splits / "val.jsonl").write_text("", encoding="utf-8")
    config = write_cpu_finetune_config(tmp_path / "cpu.yaml")
    out = tmp_path / "run"
    assert (
        main(
            ["finetune", "--config", str(config), "--data", str(splits), "--model", str(thinking_model), "-o", str(out)]
        )
        == 0
    )
    info = json.loads((out / "recipe_training_info.json").read_text(encoding="utf-8"))
    assert info["training"]["answer_prefix"] == THINK
    assert "given in the prompt, not trained" in (out / "README.md").read_text(encoding="utf-8")
    backend = LocalModelBackend(out, max_new_tokens=48, threads=1)
    for index in chosen:
        completion = backend.complete(rows[index]["prompt"])
        assert completion.text == rows[index]["completion"] and completion.finish_reason == "stop"
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
