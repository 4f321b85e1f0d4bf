"""The package as a user installs it: a wheel carries our templates, and the main job runs from it.

The wheel is built from this checkout, installed with `--no-deps` into a fresh virtual environment that sees the
already installed dependencies (`--system-site-packages`), and run from a folder outside the source tree, so nothing
can come from the checkout. `.ci/run` does the same after the README's two commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = sorted(path.name for path in (ROOT / "prompts").glob("*.jinja2"))


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": "", **env},
    )


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the venv it is installed in)."""
    scratch = tmp_path_factory.mktemp("wheel")
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(scratch / "dist"),
            str(ROOT),
        ],
        cwd=scratch,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (scratch / "dist").glob("recipe-*.whl")
    venv = scratch / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=scratch)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=scratch)
    assert installed.returncode == 0, installed.stderr
    return wheel, venv


def test_the_wheel_carries_every_template(installed_wheel):
    wheel, _ = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert TEMPLATES and [n for n in sorted(names) if n.startswith("recipe/prompts/")] == [
        f"recipe/prompts/{name}" for name in TEMPLATES
    ]


def test_the_installed_package_finds_its_templates_outside_the_source_tree(installed_wheel, tmp_path):
    _, venv = installed_wheel
    probe = (
        "import recipe, recipe.prompt as p; print(recipe.__file__); print(p.PROMPTS_DIR); "
        "print(p.bundled_template('command_prompt_v2.jinja2').sha256)"
    )
    result = _run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module, prompts_dir, sha = result.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(prompts_dir).is_relative_to(venv), result.stdout
    from recipe.prompt import bundled_template

    assert sha == bundled_template("command_prompt_v2.jinja2").sha256


def test_the_main_job_runs_from_the_wheel(installed_wheel, tmp_path):
    _, venv = installed_wheel
    result = _run(
        [
            str(venv / "bin" / "recipe"),
            "prepare-data",
            "--offline",
            "--no-progress",
            "--project",
            str(ROOT),
            "-o",
            "output",
            str(ROOT / "e2e_tests"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    splits = tmp_path / "output" / "4_train_test_split" / "ft_splits"
    assert len((splits / "train.jsonl").read_text().splitlines()) > 100
    info = json.loads((splits / "dataset_info.json").read_text())
    assert Path(info["prompt_template"]).is_relative_to(venv), info["prompt_template"]  # the wheel's copy


def test_every_subpackage_is_listed_for_the_build():
    """`packages` is listed (so prompts/ can be mapped in): a new subpackage left out would be missing from wheels."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "recipe").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "recipe.prompts" in listed
