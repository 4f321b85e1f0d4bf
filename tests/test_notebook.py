"""finetune/finetune.ipynb runs end to end (tiny model, CPU, no install) and leaves its plots and model behind.

Parameters are injected papermill-style: a cell after the one tagged `parameters` that overrides them.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from finetune_rows import example_rows
from nbclient import NotebookClient
from tiny_model import (
    CPU_FINETUNE_SETTINGS,
    build_tiny_model,
    write_cpu_finetune_config,
)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "finetune" / "finetune.ipynb"
EVAL_ROWS = 4


def inject_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> None:
    """Add a cell after the `parameters` cell, as papermill does."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    notebook.cells.insert(index + 1, cell)


@pytest.fixture
def inputs(tmp_path) -> dict:
    rows = example_rows()
    splits = tmp_path / "ft_splits"
    splits.mkdir()
    (splits / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:8]), encoding="utf-8")
    (splits / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[16:22]), encoding="utf-8")
    config = write_cpu_finetune_config(tmp_path / "cpu.yaml", num_train_epochs=1.0)
    return {
        "INSTALL": False,
        "REPO_DIR": str(REPO),
        "CONFIG": str(config),
        "DATA": str(splits),
        "MODEL": str(build_tiny_model(tmp_path / "tiny")),
        "OUTPUT_DIR": str(tmp_path / "run"),
        "UPLOAD_TO": None,
        "MERGE": True,
        "EVAL_ROWS": EVAL_ROWS,
        "MAX_NEW_TOKENS": 24,
    }


def repeat_setup_cell(notebook: nbformat.NotebookNode) -> None:
    """Run the install/set-up cell a second time right after the first, as a user re-running it would, and check
    that it changed neither the kernel's working folder nor the paths it resolved."""
    index = next(i for i, cell in enumerate(notebook.cells) if "find_repository" in cell.source)
    check = (
        "import os as _os\n_before = (_os.getcwd(), REPO, DATA_PATH, CONFIG_PATH)\n"
        + notebook.cells[index].source
        + "\nassert (_os.getcwd(), REPO, DATA_PATH, CONFIG_PATH) == _before, 'the set-up cell is not idempotent'"
    )
    cell = nbformat.v4.new_code_cell(check)
    cell["id"] = "setup-again"
    notebook.cells.insert(index + 1, cell)


@pytest.mark.parametrize("start_in", ["finetune", "repository root"])
def test_notebook_runs_end_to_end_and_leaves_plots_and_model(inputs, tmp_path, start_in):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if start_in == "repository root":
        # relative paths (to the repository root) and the repository found on its own, set-up cell run twice
        inputs = inputs | {
            "CONFIG": "finetune/config.yaml",
            "OVERRIDES": {**CPU_FINETUNE_SETTINGS, "num_train_epochs": 1.0},
        }
        del inputs["REPO_DIR"]
        repeat_setup_cell(notebook)
    inject_parameters(notebook, inputs)
    start = NOTEBOOK.parent if start_in == "finetune" else REPO
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(start)}})
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept for a look when it fails

    out = Path(inputs["OUTPUT_DIR"])
    for name in (
        "loss_curves.png",
        "training_log.csv",
        "adapter_model.safetensors",
        "adapter_config.json",
        "merged/model.safetensors",
        "README.md",
        "recipe_training_info.json",
    ):
        assert (out / name).is_file(), name
    predictions = [json.loads(line) for line in (out / "val_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == EVAL_ROWS and all(p["row"].startswith(inputs["DATA"]) for p in predictions)

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs), "the loss curves are shown"
    printed = "".join(output.get("text", "") for output in outputs)
    assert f"/{EVAL_ROWS} = " in printed and "saved in" in printed
