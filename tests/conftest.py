"""Shared fixtures: the bundled example project and its prepared data, built once per session.

Tests run from the repository root (CLI defaults like `e2e_tests/` are relative paths), fully offline: no model hub,
no OpenAI key (so `prepare-data` never reaches a paid endpoint by accident).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

for variable in ("OPENAI_API_KEY", "AZURE_API_KEY", "AZURE_OPENAI_API_KEY", "SELF_HOSTED_API_KEY"):
    os.environ.pop(variable, None)
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    MPLBACKEND="Agg",
    TOKENIZERS_PARALLELISM="false",
)
os.chdir(ROOT)


@pytest.fixture(scope="session")
def example_project():
    from recipe.project import load_project

    return load_project(ROOT)


@pytest.fixture(scope="session")
def prepared_example(tmp_path_factory) -> Path:
    """`recipe prepare-data --offline` on the bundled example; returns the output folder."""
    from recipe.cli import main

    out = tmp_path_factory.mktemp("prepared") / "output"
    assert main(["prepare-data", "--offline", "--no-progress", "-o", str(out)]) == 0
    return out
