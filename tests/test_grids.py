"""Grid layout (pure) and drawing: order of rows and columns, collisions, PNG + JSON sidecar."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_nb.errors import ConfigError
from dreambooth_nb.results.grids import cell_labels, draw_grid, format_label, layout, resolve_axes


def cell(lr, step, prompt="p", seed=0, image="x.png"):
    return {"run": f"lr-{lr:g}", "lr": lr, "step": step, "prompt": prompt, "seed": seed, "image": image}


def test_rows_keep_given_order_and_steps_sort_ascending():
    cells = [cell(5e-6, 800), cell(5e-6, 400), cell(2e-6, 400), cell(2e-6, 800)]
    rows, cols, grid = layout(cells, "lr", "step")
    assert rows == [5e-6, 2e-6]  # as given, not sorted
    assert cols == [400, 800]
    assert grid == [[cells[1], cells[0]], [cells[2], cells[3]]]


def test_missing_combination_is_an_empty_position():
    cells = [cell(5e-6, 400), cell(2e-6, 800)]
    rows, cols, grid = layout(cells, "lr", "step")
    assert grid == [[cells[0], None], [None, cells[1]]]


def test_combined_axis_gives_tuples_in_nested_order():
    cells = [cell(lr, 4, prompt=p) for lr in (5e-6, 2e-6) for p in ("a", "b")]
    rows, cols, grid = layout(cells, ("lr", "prompt"), "step")
    assert rows == [(5e-6, "a"), (5e-6, "b"), (2e-6, "a"), (2e-6, "b")]
    assert [r[0] for r in grid] == cells


def test_two_cells_on_one_position_name_the_label_to_add():
    cells = [cell(5e-6, 400, seed=0), cell(5e-6, 400, seed=1)]
    with pytest.raises(ConfigError, match=r"differ in seed.*rows=\('lr', 'seed'\)"):
        layout(cells, "lr", "step")
    with pytest.raises(ConfigError, match="listed twice"):
        layout([cells[0], dict(cells[0])], "lr", "step")


def test_axis_errors():
    cells = [cell(5e-6, 400)]
    with pytest.raises(ConfigError, match="both use step"):
        layout(cells, "step", "step")
    with pytest.raises(ConfigError, match="no cell has the label 'colour'"):
        layout(cells, "colour", "step")
    with pytest.raises(ConfigError, match="nothing to lay out"):
        layout([], "lr", "step")
    with pytest.raises(ConfigError, match="no image path"):
        layout([{"lr": 1}], "lr", "step")


def test_resolve_axes_adds_only_the_labels_needed():
    cells = [cell(lr, s, prompt=p, seed=0) for lr in (5e-6, 2e-6) for s in (2, 4) for p in ("a", "b")]
    assert resolve_axes(cells, "lr", "step") == (("lr", "prompt"), ("step",))
    assert resolve_axes(cells, "run", "prompt") == (("run", "step"), ("prompt",))
    one = [c for c in cells if c["prompt"] == "a"]
    assert resolve_axes(one, "lr", "step") == (("lr",), ("step",))


def test_dataclass_cells_and_labels():
    @dataclass
    class Item:
        step: int
        prompt: str
        image: Path

    labels, image = cell_labels(Item(3, "hi", Path("a.png")))
    assert labels == {"step": 3, "prompt": "hi"} and image == Path("a.png")
    assert format_label("lr", 5e-6) == "LR 5e-06"
    assert format_label("step", 400) == "step 400"


def _write_image(path, value):
    Image.fromarray(np.full((16, 16, 3), value, dtype="uint8")).save(path)
    return path


def test_draw_grid_writes_png_and_row_major_sidecar(tmp_path):
    cells = []
    for lr in (5e-6, 2e-6):
        for step in (800, 400):  # given out of order on purpose
            cells.append(cell(lr, step, image=_write_image(tmp_path / f"{lr:g}-{step}.png", step // 4)))
    cells.append(cell(1e-6, 400, image=_write_image(tmp_path / "lone.png", 9)))
    out = draw_grid(cells, rows="lr", cols="step", path=tmp_path / "g" / "grid.png", title="LR × steps")
    assert out == tmp_path / "g" / "grid.png"
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 100
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["rows"] == "lr" and side["cols"] == "step" and side["title"] == "LR × steps"
    assert side["row_labels"] == [5e-6, 2e-6, 1e-6] and side["col_labels"] == [400, 800]
    assert side["shape"] == [3, 2]
    order = [(c["row"], c["col"], c["labels"]["lr"], c["labels"]["step"]) for c in side["cells"]]
    assert order == [(0, 0, 5e-6, 400), (0, 1, 5e-6, 800), (1, 0, 2e-6, 400), (1, 1, 2e-6, 800), (2, 0, 1e-6, 400)]
    assert side["cells"][0]["image"] == str(tmp_path / "5e-06-400.png")
    assert not list((tmp_path / "g").glob(".tmp-*"))


def test_draw_grid_requires_png_and_readable_images(tmp_path):
    with pytest.raises(ConfigError, match=".png"):
        draw_grid([cell(1e-6, 1, image=tmp_path / "a.png")], rows="lr", cols="step", path=tmp_path / "g.jpg")
    with pytest.raises(Exception, match="cannot read"):
        draw_grid([cell(1e-6, 1, image=tmp_path / "missing.png")], rows="lr", cols="step", path=tmp_path / "g.png")


def test_grouped_columns_fit_a_notebook_and_mark_the_suggestion(tmp_path):
    """Each LR's steps side by side after the base model, prompts × seeds down: 2 LRs × 3 steps fit 1000 px."""
    cells = [dict(run="base model", lr=None, step=0, prompt=p, seed=s, image=_write_image(tmp_path / f"b{p}{s}.png", 9))
             for p in ("a", "b", "c", "d") for s in (0, 1)]
    for lr in (1e-3, 1e-4):
        for step in (100, 200, 400):
            cells += [cell(lr, step, prompt=p, seed=s, image=_write_image(tmp_path / f"{lr:g}{step}{p}{s}.png", step // 2))
                      for p in ("a", "b", "c", "d") for s in (0, 1)]
    marked = [{"run": "lr-0.0001", "step": 200}]
    out = draw_grid(cells, rows=("prompt", "seed"), cols=("run", "step"), path=tmp_path / "grid.png", title="LR × steps",
                    max_width=1000, highlight=marked)
    with Image.open(out) as png:
        assert png.size[0] <= 1000 and png.size[1] < 1400
        frame = np.asarray(png.convert("RGB"))
    assert (np.abs(frame.astype(int) - (0x1a, 0x98, 0x50)).sum(axis=-1) < 30).sum() > 500  # the green frame
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["highlight"] == marked and side["shape"] == [8, 7]
    assert side["col_labels"][:2] == [["base model", 0], ["lr-0.001", 100]]
    assert side["row_labels"][:2] == [["a", 0], ["a", 1]]
