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
from tiny_model import build_tiny_model, write_cpu_finetune_config

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


def test_notebook_runs_end_to_end_and_leaves_plots_and_model(inputs, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(notebook, inputs)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # kept for a look when it fails

    out = Path(inputs["OUTPUT_DIR"])
    for name in ("loss_curves.png", "training_log.csv", "adapter_model.safetensors", "adapter_config.json",
                 "merged/model.safetensors", "README.md", "recipe_training_info.json"):
        assert (out / name).is_file(), name
    predictions = [json.loads(line) for line in (out / "val_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == EVAL_ROWS and all(p["row"].startswith(inputs["DATA"]) for p in predictions)

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs), "the loss curves are shown"
    printed = "".join(output.get("text", "") for output in outputs)
    assert f"/{EVAL_ROWS} = " in printed and "saved in" in printed
