"""Finetuning rows: reading, conversion to one prompt/completion form, tokenization with the label mask, lengths.

Both row formats of prepare-data (rasa-formats.md §7) become an `Example` (prompt messages, completion text):
instruction rows `{"prompt", "completion"}` turn into one user message, as Rasa Pro sends the prompt to chat
completions (known-weaknesses A.25); conversational rows `{"messages": [..., assistant]}` keep their messages.

We tokenize here, not in TRL, for three reasons: the loss must cover exactly the completion plus the end-of-turn token
(TRL's conversational path also trains whatever the chat template prints after that token, e.g. ChatML's newline,
which the model never generates); the exact length of every row is needed to size `max_length` and to name a row
that would be cut (TRL truncates and drops silently); and `generate_completions` must encode prompts the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from recipe.artifacts import DATASET_INFO_FILE, TRAIN_FILE, VAL_FILE
from recipe.errors import ConfigError, InputError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import BatchEncoding, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training row: the messages before the answer, the answer (DSL lines), and where the row came from."""

    prompt: tuple[dict[str, str], ...]
    completion: str
    path: str
    line: int


@dataclass(frozen=True)
class Encoded:
    """Token ids of a whole row and which of them the loss covers (1 = completion or end-of-turn token)."""

    input_ids: list[int]
    completion_mask: list[int]

    @property
    def prompt_length(self) -> int:
        return self.completion_mask.index(1)


@dataclass(frozen=True)
class PromptFormat:
    """How rows become token ids: through the tokenizer's chat template ("chat") or as raw strings ("raw").

    `end_token` is the token that closes the answer and stops generation (`<|eot_id|>` for Llama 3, `<|im_end|>`
    for ChatML, the eos token for raw strings).
    """

    kind: str
    end_token: str
    # Text the chat template writes at the start of every assistant answer (a Qwen3-style template's empty
    # `<think>\n\n</think>\n\n`). Moved into the prompt: encoded after the generation prompt, never trained on,
    # so the model learns the DSL lines only and the runtime parses what it generates.
    answer_prefix: str = ""


@dataclass(frozen=True)
class DataFiles:
    train: Path
    val: Path | None  # may be empty (prepare-data --train-frac 1): then there is no validation
    dataset_info: Path | None
    no_val_reason: str | None = None  # why `val` is None, for the warning


def validation_warning(files: DataFiles, val_rows: int) -> str | None:
    """The one warning line for a run without validation rows; None when there are some."""
    if files.val is None:
        return f"{files.no_val_reason}: training without validation"
    if val_rows == 0:
        return f"{files.val} is empty: training without validation"
    return None


def resolve_data_files(data: str, val_data: str | None) -> DataFiles:
    """`data` is the ft_splits folder (train.jsonl, optional val.jsonl and dataset_info.json) or a train file."""
    data_path = Path(data)
    if data_path.is_dir():
        train = data_path / TRAIN_FILE
        if not train.is_file():
            raise ConfigError(f"{data_path}: no {TRAIN_FILE} in this folder (expected prepare-data's ft_splits)")
        val: Path | None = Path(val_data) if val_data else data_path / VAL_FILE
        info_dir = data_path
        no_val_reason = f"no {VAL_FILE} in {data_path}"
    elif data_path.is_file():
        train = data_path
        val = Path(val_data) if val_data else None
        info_dir = data_path.parent
        # A file as --data: a val.jsonl beside it is not picked up on its own; say so when there is one.
        beside = data_path.parent / VAL_FILE
        no_val_reason = "no validation file given" + (
            f" ({beside} is not used: give it as the second --data path)"
            if beside.is_file() and beside != data_path
            else " (--data TRAIN.jsonl VAL.jsonl)"
        )
    else:
        raise ConfigError(f"{data_path}: training data not found")
    if val_data and val is not None and not val.is_file():  # val is set whenever val_data is
        raise ConfigError(f"{val}: validation file not found")
    info = info_dir / DATASET_INFO_FILE
    has_val = val is not None and val.is_file()
    return DataFiles(
        train=train,
        val=val if has_val else None,
        dataset_info=info if info.is_file() else None,
        no_val_reason=None if has_val else no_val_reason,
    )


def read_examples(path: Path, allow_empty: bool = False) -> list[Example]:
    """Read a JSONL file of instruction or conversational rows; any malformed row is an error at `path:line`.

    A file without rows is an error unless `allow_empty` (the val file: prepare-data writes an empty one when every
    test case went to train).
    """
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise InputError(path, number, f"invalid JSON: {error.msg}") from error
            examples.append(example_from_row(row, str(path), number))
    if not examples and not allow_empty:
        raise InputError(path, None, "no rows")
    return examples


def shortest(examples: list[Example], limit: int | None) -> list[Example]:
    """The `limit` shortest rows (by characters, ties in file order), in file order; every row without a limit."""
    if limit is None or len(examples) <= limit:
        return examples
    size = {
        id(example): sum(len(m["content"]) for m in example.prompt) + len(example.completion) for example in examples
    }
    kept = {id(example) for example in sorted(examples, key=lambda example: size[id(example)])[:limit]}
    return [example for example in examples if id(example) in kept]


def example_from_row(row: Any, path: str, line: int) -> Example:
    """Convert one row of either format; the answer must be non-empty text."""

    def fail(message: str) -> InputError:
        return InputError(path, line, message)

    if not isinstance(row, dict):
        raise fail("expected a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise fail('"messages" must list the prompt message(s) and the assistant answer')
        for message in messages:
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise fail('every message needs a string "role" and "content"')
        if messages[-1]["role"] != "assistant":
            raise fail('the last message must be the assistant\'s answer (role "assistant")')
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
        completion = messages[-1]["content"]
    elif "prompt" in row and ("completion" in row or "output" in row):
        # `output` is the answer's key in llm_ft_data.jsonl, prepare-data's file of all rows.
        answer = row["completion"] if "completion" in row else row["output"]
        if not isinstance(row["prompt"], str) or not isinstance(answer, str):
            raise fail('"prompt" and "completion" must be strings')
        prompt = ({"role": "user", "content": row["prompt"]},)
        completion = answer
    else:
        raise fail('expected {"prompt", "completion"}, {"prompt", "output"} or {"messages": [...]}')
    if not completion.strip():
        raise fail("empty completion: nothing to learn")
    return Example(prompt=prompt, completion=completion, path=path, line=line)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    added = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


TEMPLATE_ANSWER_TEXT = ("prompt", "train", "error")


@dataclass(frozen=True)
class TemplateInjection:
    """What a chat template adds around an assistant answer: before it, and after it (before the end token)."""

    prefix: str
    suffix: str

    def describe(self) -> str:
        parts = [
            f"{json.dumps(text)} {where}" for text, where in ((self.prefix, "before"), (self.suffix, "after")) if text
        ]
        return " and ".join(parts) + " every answer"


def template_injection(tokenizer: PreTrainedTokenizerBase, probe: Example) -> TemplateInjection | None:
    """Render a probe conversation with and without its answer and compare the answer part with the answer: None
    when the template writes the answer as given; else what it injects (None too where the answer is not found in
    it at all: then the template rewrites answers, which encode_example's own checks report)."""
    prompt_ids = encode_prompt(tokenizer, probe.prompt, "chat")
    full_ids = _render_chat(tokenizer, [*probe.prompt, {"role": "assistant", "content": probe.completion}])
    answer_ids = full_ids[_common_prefix(prompt_ids, full_ids) :]
    specials = special_token_ids(tokenizer)
    end = next((index for index, token_id in enumerate(answer_ids) if token_id in specials), len(answer_ids))
    text = cast(  # one sequence of ids decodes to one str
        str, tokenizer.decode(answer_ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    )
    if text == probe.completion:
        return None
    at = text.find(probe.completion)
    if at < 0:
        return None
    return TemplateInjection(prefix=text[:at], suffix=text[at + len(probe.completion) :])


def choose_prompt_format(
    tokenizer: PreTrainedTokenizerBase, requested: str, probe: Example, template_answer_text: str = "prompt"
) -> PromptFormat:
    """The tokenizer's chat template when it has one (what Rasa Pro's chat-completions call gets), else raw strings.

    A template that injects text into the assistant turn (Qwen3's empty think block) would train that text before
    every answer, and the runtime would then read its lines as unparseable. `template_answer_text` says what to do:
    "prompt" (default) moves the injected prefix into the prompt (`PromptFormat.answer_prefix`: given to the model
    at generation, never trained), "train" trains it as rendered, "error" stops. Each warns or says why."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise ConfigError("prompt_format: chat, but the tokenizer has no chat template; use auto or raw")
    if requested == "raw" or not has_template:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos token, so the model could not learn to stop")
        return PromptFormat(kind="raw", end_token=tokenizer.eos_token)
    # Render one row to learn which special token the template puts right after the answer.
    prompt_ids = encode_prompt(tokenizer, probe.prompt, "chat")
    full_ids = _render_chat(tokenizer, [*probe.prompt, {"role": "assistant", "content": probe.completion}])
    answer_ids = full_ids[_common_prefix(prompt_ids, full_ids) :]
    specials = special_token_ids(tokenizer)
    end_ids = [token_id for token_id in answer_ids if token_id in specials]
    if not end_ids:
        raise ConfigError(
            "the chat template does not close the assistant turn with a special token, so the model could not "
            "learn to stop; set prompt_format: raw"
        )
    end_token = cast(str, tokenizer.convert_ids_to_tokens(end_ids[0]))  # one id gives one token
    injection = template_injection(tokenizer, probe)
    if injection is None:
        return PromptFormat(kind="chat", end_token=end_token)
    what = f"the chat template writes {injection.describe()}"
    if template_answer_text == "error":
        raise ConfigError(
            f"{what}; set template_answer_text: prompt (give it to the model as part of the prompt) or "
            "train (train it), or use another chat template"
        )
    if template_answer_text == "train":
        log.warning(
            "%s: training it as rendered (template_answer_text: train); the runtime will read those lines "
            "as unparseable unless the model is served with the same template",
            what,
        )
        return PromptFormat(kind="chat", end_token=end_token)
    if injection.suffix.strip():
        log.warning(
            "%s: the text after the answer is trained as rendered; only a prefix can move into the prompt", what
        )
    if injection.prefix:
        log.warning(
            "%s: the prefix is given to the model after the generation prompt instead of trained, in "
            "training, evaluate and serve alike (template_answer_text: prompt). Another server (vLLM) must "
            'render it too: for Qwen3, chat_template_kwargs {"enable_thinking": false}',
            what,
        )
    return PromptFormat(kind="chat", end_token=end_token, answer_prefix=injection.prefix)


def _render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    encoded = cast(  # what tokenize=True, return_dict=True returns
        "BatchEncoding", tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    )
    return list(encoded["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: tuple[dict[str, str], ...] | list, kind: str, answer_prefix: str = ""
) -> list[int]:
    """Token ids the model sees before it answers: in training, in `generate_completions`, and when served (then
    the template's injected answer prefix, if any)."""
    if kind == "chat":
        ids = _render_chat(tokenizer, list(prompt), add_generation_prompt=True)
        if answer_prefix:
            ids += list(tokenizer(answer_prefix, add_special_tokens=False)["input_ids"])
        return ids
    if len(prompt) != 1:
        raise ConfigError("raw prompts must be a single message; multi-message rows need a chat template")
    return list(tokenizer(prompt[0]["content"])["input_ids"])


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, prompt_format: PromptFormat) -> Encoded:
    """Prompt ids, then the answer ids up to and including the end-of-turn token; the mask marks the answer."""
    prompt_ids = encode_prompt(tokenizer, example.prompt, prompt_format.kind, prompt_format.answer_prefix)
    end_id = tokenizer.convert_tokens_to_ids(prompt_format.end_token)
    if prompt_format.kind == "chat" and prompt_format.answer_prefix:
        # The prompt ends with the template's injected prefix, as at generation; the answer is what the model will
        # generate after it: the completion's own tokens and the end token (the full render's tokens could merge
        # across the prefix's end, e.g. "\n\nstart", which generation never sees).
        answer_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [end_id]
    elif prompt_format.kind == "chat":
        full_ids = _render_chat(tokenizer, [*example.prompt, {"role": "assistant", "content": example.completion}])
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise InputError(
                example.path,
                example.line,
                "the chat template renders this prompt differently with and without the answer, so training "
                "would not match serving; set prompt_format: raw",
            )
        answer_ids = full_ids[len(prompt_ids) :]
        if end_id not in answer_ids:
            raise InputError(
                example.path, example.line, f"the chat template did not end the answer with {prompt_format.end_token}"
            )
        # Whatever the template prints after the end token (ChatML's newline) is never generated: leave it out.
        answer_ids = answer_ids[: answer_ids.index(end_id) + 1]
    else:
        # Encode the answer on its own, as the model will produce it after the prompt, then the eos token.
        answer_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [end_id]
    return Encoded(input_ids=prompt_ids + answer_ids, completion_mask=[0] * len(prompt_ids) + [1] * len(answer_ids))


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], prompt_format: PromptFormat
) -> list[Encoded]:
    return [encode_example(tokenizer, example, prompt_format) for example in examples]


def resolve_max_length(requested: int | None, examples: list[Example], encoded: list[Encoded]) -> int:
    """The longest row when not set; when set, a row that would be cut is an error naming it (TRL would cut it)."""
    longest = max(len(row.input_ids) for row in encoded)
    if requested is None:
        return longest
    too_long = [(example, row) for example, row in zip(examples, encoded) if len(row.input_ids) > requested]
    if too_long:
        example, row = too_long[0]
        others = (
            f" ({len(too_long) - 1} more rows are too long; the longest has {longest})" if len(too_long) > 1 else ""
        )
        raise InputError(
            example.path,
            example.line,
            f"row is {len(row.input_ids)} tokens ({row.prompt_length} prompt + "
            f"{len(row.input_ids) - row.prompt_length} completion), longer than max_length {requested}; raise "
            f"--max-length or leave it unset to use the longest row{others}",
        )
    return requested


def to_dataset(encoded: list[Encoded]) -> Dataset:
    """A tokenized dataset TRL takes as is: it builds labels from `completion_mask` (with completion_only_loss)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [row.input_ids for row in encoded], "completion_mask": [row.completion_mask for row in encoded]}
    )


def token_stats(encoded: list[Encoded]) -> dict[str, Any]:
    prompt = [row.prompt_length for row in encoded]
    answer = [len(row.input_ids) - row.prompt_length for row in encoded]
    return {
        "rows": len(encoded),
        "prompt_tokens": {"min": min(prompt), "median": statistics.median(prompt), "max": max(prompt)},
        "completion_tokens": {"min": min(answer), "median": statistics.median(answer), "max": max(answer)},
        "total_tokens": sum(prompt) + sum(answer),
    }


def command_counts(examples: list[Example]) -> dict[str, int]:
    """Commands per type across completions, keyed by the first two words (`start flow`, `set slot`, ...)."""
    counts: Counter[str] = Counter()
    for example in examples:
        for line in example.completion.splitlines():
            words = line.split()
            if words:
                counts[" ".join(words[:2]) if "(" not in words[0] else words[0].split("(")[0]] += 1
    return dict(counts.most_common())


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
