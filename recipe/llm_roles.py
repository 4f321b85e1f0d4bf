"""prepare-data's LLM roles (rephraser, teacher, oracle): their default models, how their YAML configs are read, and
which LLM plays each role in a run (`choose_role_llms`).

A role config holds an LLM at top level or under `llm:`, inline or as a `model_group` of the project's endpoints.yml;
keys it leaves out come from the role's default. The rephraser's config may also name its `prompt_template`.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class RoleLLMs:
    """Which LLM plays each role in one run. `offline` means none does (assertion annotator, rule-based paraphrases,
    lexical check); `offline_reason` says why when nobody asked for it with --offline."""

    offline: bool
    offline_reason: str | None = None
    rephraser: LLMConfig | None = None
    rephrase_template: PromptTemplate | None = None
    teacher: LLMConfig | None = None
    oracle: LLMConfig | None = None


def choose_role_llms(
    *,
    project_root: Path,
    offline: bool,
    annotator: str,
    num_rephrases: int,
    rephrase_config: Path | None,
    teacher_config: Path | None,
    oracle_config: Path | None,
    openai_key_set: bool,
) -> RoleLLMs:
    """The LLM of each role, with its key checked now, before any paid call: a role's config file wins, else its
    default model (the oracle's default is the teacher); no config and no OpenAI key means offline, said not silent."""
    configured = any([rephrase_config, teacher_config, oracle_config, openai_key_set])
    needless = annotator == "assertions" and num_rephrases == 0
    if offline or not configured or needless:
        if annotator == "llm":
            raise ConfigError(
                "--annotator llm needs an LLM: give --teacher-config or set OPENAI_API_KEY, without --offline"
            )
        reason = None
        if not offline:
            reason = (
                "--annotator assertions with --num-rephrases 0 needs no LLM"
                if configured
                else "no LLM is configured (no --rephrase-config, --teacher-config or --oracle-config, and "
                "OPENAI_API_KEY is not set)"
            )
        return RoleLLMs(offline=True, offline_reason=reason)

    rephraser, rephrase_template = DEFAULT_REPHRASE_MODEL, None
    if rephrase_config:
        rephraser, rephrase_template = load_rephrase_config(rephrase_config, project_root)
    teacher = (
        load_llm_role_config(teacher_config, project_root, DEFAULT_TEACHER_MODEL)
        if teacher_config
        else DEFAULT_TEACHER_MODEL
    )
    oracle = load_llm_role_config(oracle_config, project_root, teacher) if oracle_config else teacher
    roles = RoleLLMs(
        offline=False,
        rephraser=rephraser,
        rephrase_template=rephrase_template,
        teacher=None if annotator in ("test", "assertions") else teacher,
        oracle=oracle,
    )
    called = {"rephraser": num_rephrases > 0, "teacher": roles.teacher is not None, "oracle": num_rephrases > 0}
    for role, llm in (("rephraser", rephraser), ("teacher", teacher), ("oracle", oracle)):
        if not called[role]:
            continue
        try:
            llm.api_key()
        except ConfigError as error:
            flag = "--rephrase-config" if role == "rephraser" else f"--{role}-config"
            raise ConfigError(
                f"the {role} ({llm.provider} {llm.model}): {error}; or give {flag} (with --offline, no LLM is used)"
            ) from None
    return roles
