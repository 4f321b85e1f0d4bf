"""`recipe rasa-config`: the two YAML blocks that point a Rasa Pro assistant at a served finetuned model.

`endpoints.yml` gets a model group (provider self-hosted, the server's `api_base`, the served model name, temperature
0, a bounded `max_tokens`); `config.yml` gets the command generator of the trained syntax with `llm: {model_group}`,
the `prompt_template` the model was trained with and `include_date_time` as in training. Never
`provider: rasa`: that provider sends the Rasa licence as the bearer token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.commands import Syntax
from recipe.errors import ConfigError
from recipe.prompt import PROMPTS_DIR, load_template
from recipe.yamlio import dump_yaml

GENERATOR_FOR_SYNTAX = {
    Syntax.V1: "SingleStepLLMCommandGenerator",
    Syntax.V2: "CompactLLMCommandGenerator",
    Syntax.V3: "SearchReadyLLMCommandGenerator",
}


@dataclass(frozen=True)
class RasaConfig:
    endpoints: dict[str, Any]
    config: dict[str, Any]
    notes: tuple[str, ...]  # what the user must do that YAML cannot say

    def render(self) -> str:
        blocks = ["# endpoints.yml\n" + dump_yaml(self.endpoints), "# config.yml\n" + dump_yaml(self.config)]
        return "\n".join(blocks) + "".join(f"# {note}\n" for note in self.notes)


def rasa_config(
    *,
    model_name: str,
    api_base: str,
    training_info: dict[str, Any] | None,
    prompt_template: str | None,
    syntax: str | None,
    group_id: str = "finetuned_command_generator",
    max_tokens: int = 256,
    api_key_env: str | None = None,
    use_completions: bool = False,
    project_dir: Path = Path("."),
) -> RasaConfig:
    """The endpoints.yml model group and config.yml pipeline entry for `model_name` served at `api_base`
    (`prompt_template` relative to the assistant's `project_dir`, as Rasa reads it)."""
    info = training_info or {}
    if not api_base.startswith(("http://", "https://")):
        raise ConfigError(f"--api-base {api_base!r}: expected the server's URL, e.g. http://llm-host:8000/v1")
    trained = info.get("command_syntax")
    if syntax and trained and syntax != trained:
        raise ConfigError(
            f"--command-syntax {syntax} contradicts the model, which was trained with {trained} "
            f"commands; leave --command-syntax out or pass {trained}"
        )
    chosen = syntax or trained
    if not chosen:
        raise ConfigError("no command syntax: the model folder has no training info; pass --command-syntax")
    try:
        generator = GENERATOR_FOR_SYNTAX[Syntax(chosen)]
    except (ValueError, KeyError):
        raise ConfigError(f"command syntax {chosen!r}: expected v1, v2 or v3") from None
    template = prompt_template or info.get("prompt_template")
    if not template:
        raise ConfigError("no prompt template: the model folder has no training info; pass --prompt-template")
    notes = []
    if not prompt_template:
        # The training path is a path on this machine; the assistant needs its own copy, relative to its project.
        template = f"prompts/{Path(template).name}"
        notes.append(
            f"copy the template the model was trained with to {template} in the assistant project, or use "
            "--write-template FILE to write the exact trained text and point prompt_template at it"
        )
    elif not (project_dir / template).is_file():
        notes.append(
            f"copy {template} into the assistant project and point prompt_template at the copy "
            "(or use --write-template FILE)"
        )
    elif (
        info.get("prompt_template_sha256")
        and load_template(project_dir / template).sha256 != info["prompt_template_sha256"]
    ):
        notes.append(
            f"WARNING: {template} is not the template the model was trained with (sha256 differs); use "
            "--write-template FILE to write that one"
        )
    model: dict[str, Any] = {
        "provider": "self-hosted",
        "model": model_name,
        "api_base": api_base.rstrip("/"),
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }
    if api_key_env:
        model["api_key"] = "${" + api_key_env + "}"
    if use_completions or (info.get("training") or {}).get("prompt_format") == "raw":
        model["use_chat_completions_endpoint"] = False  # trained on raw prompts: no chat template around them
    endpoints = {"model_groups": [{"id": group_id, "models": [model]}]}
    component = {
        "name": generator,
        "llm": {"model_group": group_id},
        "prompt_template": template,
        "include_date_time": bool(info.get("include_date_time", False)),
        "flow_retrieval": {"active": False},  # every flow in the prompt, as in the training rows
    }
    retrieval = info.get("flow_retrieval") or {}
    if retrieval.get("active"):  # the training prompts listed the flows retrieval picked: keep it, same embeddings
        embeddings = dict(retrieval.get("embeddings") or {})
        if embeddings.get("provider") == "self-hosted":
            embeddings["provider"] = "openai"  # an OpenAI-compatible endpoint: provider openai with its api_base
        component["flow_retrieval"] = {
            "active": True,
            "embeddings": {key: value for key, value in embeddings.items() if value is not None},
            "num_flows": retrieval.get("num_flows", 20),
            "turns_to_embed": retrieval.get("turns_to_embed", 1),
            "should_embed_slots": retrieval.get("should_embed_slots", True),
        }
        notes.append(
            "the training prompts list the flows flow retrieval picked: keep flow_retrieval on with the same "
            "embeddings model and settings (check that api_base is reachable from the assistant)"
        )
    notes.append("after changing config.yml or the template: rasa train, then rasa test e2e on the validation tests")
    return RasaConfig(endpoints, {"pipeline": [component]}, tuple(notes))


def write_trained_template(training_info: dict[str, Any] | None, path: Path) -> Path:
    """Write the template text recorded at training time to `path` (refusing to replace a different file)."""
    text = (training_info or {}).get("prompt_template_text")
    if not text:
        raise ConfigError("--write-template needs --model with training info that records the template text")
    if path.resolve().is_relative_to(PROMPTS_DIR.resolve()):
        raise ConfigError(
            f"{path}: that is recipe's own template folder ({PROMPTS_DIR}), not the assistant's; write "
            "the copy into the assistant project (--project DIR --write-template prompts/NAME.jinja2)"
        )
    if path.exists() and path.read_text(encoding="utf-8") != text:
        raise ConfigError(f"{path}: exists with other content; choose another file or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
