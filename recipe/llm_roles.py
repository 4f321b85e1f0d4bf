"""prepare-data's LLM roles (rephraser, teacher, oracle): their default models, and how their YAML configs are read.

A role config holds an LLM at top level or under `llm:`, inline or as a `model_group` of the project's endpoints.yml;
keys it leaves out come from the role's default. The rephraser's config may also name its `prompt_template`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.llm import LLMConfig
from recipe.prompt import PromptTemplate, load_template
from recipe.yamlio import load_yaml, plain

DEFAULT_REPHRASE_MODEL = LLMConfig(provider="openai", model="gpt-4o-mini", temperature=1.0)
DEFAULT_TEACHER_MODEL = LLMConfig(provider="openai", model="gpt-4o", temperature=0.0)


def load_rephrase_config(path: Path, project_root: Path) -> tuple[LLMConfig, PromptTemplate | None]:
    """`--rephrase-config`: keys `prompt_template` and `llm` (inline model, or `model_group` from endpoints.yml)."""
    data = plain(load_yaml(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `llm` and optionally `prompt_template`")
    unknown = set(data) - {"llm", "prompt_template"}
    if unknown:
        raise ConfigError(f"{path}: unknown key `{sorted(unknown)[0]}`; expected `llm` and `prompt_template`")
    template = None
    if data.get("prompt_template"):
        template_path = Path(data["prompt_template"])
        if not template_path.is_absolute():
            template_path = (path.parent / template_path) if (path.parent / template_path).exists() else template_path
        template = load_template(check_utf8_file(template_path, f"{path}: prompt_template"))
    llm = resolve_llm_mapping(data.get("llm") or {}, str(path), project_root, DEFAULT_REPHRASE_MODEL)
    return llm, template


def check_utf8_file(path: Path, what: str) -> Path:
    """`path`, once it is known to be readable UTF-8 text (a `ConfigError` naming it otherwise)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: {what} is not UTF-8 text ({error.reason} at byte {error.start}); expected a UTF-8 Jinja2 file"
        ) from None
    except OSError:
        pass  # missing or unreadable: the loader says so in its own words
    return path


def load_llm_role_config(path: Path, project_root: Path, default: LLMConfig) -> LLMConfig:
    """`--teacher-config` / `--oracle-config`: an LLM config at top level or under `llm:`, inline or `model_group`;
    keys it leaves out come from the role's default."""
    data = plain(load_yaml(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with the LLM's provider, model, ... (or `llm:` holding them)")
    return resolve_llm_mapping(data.get("llm", data) or {}, str(path), project_root, default)


def resolve_llm_mapping(data: dict[str, Any], source: str, project_root: Path, default: LLMConfig) -> LLMConfig:
    """An inline model config, or `model_group: <id>` resolved from the project's endpoints.yml."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: `llm` must be a mapping (provider, model, ... or model_group), got {type(data).__name__}"
        )
    if "model_group" in data:
        endpoints = project_root / "endpoints.yml"
        content = (plain(load_yaml(endpoints)) or {}) if endpoints.is_file() else {}
        groups = content.get("model_groups", []) if isinstance(content, dict) else []
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ConfigError(
                f"{endpoints}: `model_groups` must be a list of groups (`- id: ...`, `models: [...]`), "
                f"got {type(groups).__name__}"
            )
        group = next((g for g in groups if g.get("id") == data["model_group"]), None)
        models = group.get("models") if group else None
        if not models or not isinstance(models, list) or not isinstance(models[0], dict):
            raise ConfigError(
                f"{source}: model_group `{data['model_group']}` not found in {endpoints} (expected it "
                "with a list of `models`)"
            )
        data = {k: v for k, v in models[0].items() if k in LLMConfig.__dataclass_fields__ or k in ("model_name",)}
    merged = {k: v for k, v in vars(default).items() if v is not None} | dict(data)
    return LLMConfig.from_mapping(merged, source=source)
