"""Comparison grids: images laid out by their labels, saved as a PNG with a JSON sidecar.

    draw_grid(cells, rows="lr", cols="step", path="grid.png")

A cell is a dict or dataclass with an image path (key `image`, `image_path` or `path`) and labels such
as run, lr, step, prompt, seed (`evaluate.Rendered` is one). `rows` and `cols` name the label on each
axis; a tuple of names makes a combined axis, e.g. rows=("lr", "prompt") gives one row per LR and prompt.

The layout is pure and tested on its own (`layout`); an axis keeps the order in which its values first
appear in `cells`, except `step`, which is sorted ascending. Two cells on the same position is an
error that says which label to add to an axis: a grid never drops an image silently.

The sidecar (`grid.json` beside `grid.png`) records the axes, their labels, and every cell (row, col,
labels, image) in row-major order.
"""

from __future__ import annotations

import dataclasses
import io
import textwrap
from collections.abc import Mapping
from pathlib import Path

from dreambooth_nb import storage
from dreambooth_nb.errors import ConfigError, DataError

LABELS = ("run", "lr", "step", "prompt", "seed")
_IMAGE_KEYS = ("image", "image_path", "path")
_SORTED = {"step"}  # axes sorted by value; every other axis keeps first-appearance order


# --- Cells ------------------------------------------------------------------------------------------------
def cell_labels(cell) -> tuple[dict, Path]:
    """(labels, image path) of one cell given as a dict or a dataclass."""
    if dataclasses.is_dataclass(cell) and not isinstance(cell, type):
        data = {f.name: getattr(cell, f.name) for f in dataclasses.fields(cell)}
    elif isinstance(cell, Mapping):
        data = dict(cell)
    else:
        raise ConfigError(f"cells: each cell must be a dict or dataclass with an image path and labels, "
                          f"got {type(cell).__name__}.")
    image_key = next((k for k in _IMAGE_KEYS if data.get(k) is not None), None)
    if image_key is None:
        raise ConfigError(f"cells: a cell has no image path (one of {', '.join(_IMAGE_KEYS)}): {data!r}.")
    image = Path(data.pop(image_key))
    labels = dict(data.pop("labels", None) or {})
    for key, value in data.items():
        if key not in _IMAGE_KEYS:
            labels.setdefault(key, value)
    return {k: _jsonable(v) for k, v in labels.items()}, image


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _axis(names, what: str) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{what}: name a label such as {', '.join(LABELS)} (or a tuple of them).")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: {names} names a label twice.")
    return names


def _key(labels: dict, names: tuple[str, ...]):
    return tuple(labels.get(n) for n in names)


def _ordered(values: list, names: tuple[str, ...]) -> list:
    """Distinct axis keys: each component in first-appearance order, `step` ascending (None last)."""
    orders = []
    for i, name in enumerate(names):
        seen = list(dict.fromkeys(v[i] for v in values))
        if name in _SORTED:
            seen.sort(key=lambda x: (x is None, x if isinstance(x, (int, float)) else 0, str(x)))
        orders.append({v: rank for rank, v in enumerate(seen)})
    distinct = list(dict.fromkeys(values))
    return sorted(distinct, key=lambda v: tuple(orders[i][c] for i, c in enumerate(v)))


# --- Layout (pure) ------------------------------------------------------------------------------------------
def layout(cells, rows, cols):
    """Place `cells` on a grid: returns (row_labels, col_labels, grid).

    `grid[i][j]` is the cell (as given) at row i and column j, or None where no cell has that
    combination. Labels are plain values for a one-label axis and tuples for a combined axis.
    Raises `ConfigError` if two cells land on one position, naming the labels that tell them apart.
    """
    cells = list(cells)
    if not cells:
        raise ConfigError("cells: nothing to lay out (no images); render some first.")
    row_names, col_names = _axis(rows, "rows"), _axis(cols, "cols")
    both = set(row_names) & set(col_names)
    if both:
        raise ConfigError(f"rows and cols both use {', '.join(sorted(both))}; put each label on one axis only.")
    labels = [cell_labels(c)[0] for c in cells]
    for name in row_names + col_names:
        if not any(name in lab for lab in labels):
            known = sorted({k for lab in labels for k in lab})
            raise ConfigError(f"no cell has the label {name!r}; the cells have {', '.join(known)}.")
    row_keys = _ordered([_key(lab, row_names) for lab in labels], row_names)
    col_keys = _ordered([_key(lab, col_names) for lab in labels], col_names)
    row_index = {k: i for i, k in enumerate(row_keys)}
    col_index = {k: j for j, k in enumerate(col_keys)}
    grid = [[None] * len(col_keys) for _ in row_keys]
    placed = [[None] * len(col_keys) for _ in row_keys]
    for n, (cell, lab) in enumerate(zip(cells, labels)):
        i, j = row_index[_key(lab, row_names)], col_index[_key(lab, col_names)]
        if grid[i][j] is not None:
            raise ConfigError(_collision_message(labels[placed[i][j]], lab, row_names, col_names))
        grid[i][j], placed[i][j] = cell, n

    def plain(keys, names):
        return [k[0] for k in keys] if len(names) == 1 else list(keys)

    return plain(row_keys, row_names), plain(col_keys, col_names), grid


def _collision_message(first: dict, second: dict, row_names, col_names) -> str:
    where = ", ".join(f"{n}={first.get(n)!r}" for n in row_names + col_names)
    differ = [k for k in dict.fromkeys([*first, *second]) if first.get(k) != second.get(k)]
    if not differ:
        return f"two cells are identical ({where}): the same image is listed twice; remove the repeat."
    useful = [k for k in differ if k in LABELS] or differ
    example = tuple(row_names) + (useful[0],)
    return (f"two images land on the same grid position ({where}); they differ in {', '.join(useful)}. "
            f"Put one of these on an axis too, e.g. rows={example!r}, or filter the cells to one "
            f"{useful[0]}.")


def resolve_axes(cells, rows, cols, *, extras=("prompt", "seed", "run", "lr", "step")):
    """`rows` extended by the labels needed so no two cells share a position (what `compare` draws).

    Labels from `extras` are appended to the row axis, in that order, only while two cells still
    collide and differ in that label. Returns (rows, cols) as tuples.
    """
    row_names, col_names = list(_axis(rows, "rows")), _axis(cols, "cols")
    labels = [cell_labels(c)[0] for c in cells]
    while True:
        names = tuple(row_names) + col_names
        groups: dict = {}
        for lab in labels:
            groups.setdefault(_key(lab, names), []).append(lab)
        varying = {e for group in groups.values() if len(group) > 1 for e in extras
                   if len({_key(lab, (e,)) for lab in group}) > 1}
        extra = next((e for e in extras if e in varying and e not in names), None)
        if extra is None:  # no collision left, or nothing to add (layout() then explains the collision)
            return tuple(row_names), col_names
        row_names.append(extra)


# --- Labels as text -----------------------------------------------------------------------------------------
def format_label(name: str, value, *, width: int = 24) -> str:
    """Readable text for one label value: 'LR 5e-06', 'step 400', 'seed 0', a wrapped quoted prompt."""
    if name == "lr":
        return "LR ?" if value is None else f"LR {value:g}" if isinstance(value, (int, float)) else f"LR {value}"
    if name == "prompt":
        return textwrap.fill(f"“{value}”", width=width)
    if name in ("step", "seed"):
        return f"{name} {'?' if value is None else value}"
    if name == "run":
        return textwrap.fill(str(value), width=width)
    return f"{name} {value}"


def format_axis_label(names, value, *, width: int = 24) -> str:
    names = (names,) if isinstance(names, str) else tuple(names)
    values = (value,) if len(names) == 1 else tuple(value)
    return "\n".join(format_label(n, v, width=width) for n, v in zip(names, values))


# --- Drawing ------------------------------------------------------------------------------------------------
NOTEBOOK_WIDTH = 1000
"""Pixels a grid may take across to be seen whole in a notebook cell (Jupyter's and Colab's output area on
an ordinary laptop screen is about this wide): `compare` and `sweep` fit their grids into it."""
HIGHLIGHT = "#1a9850"  # the frame of a marked cell (the suggested snapshot)
_GAP, _GROUP_GAP = 0.04, 0.16  # inches between cells, and between groups of an axis (e.g. learning rates)
_CHAR = 0.075  # inches per character of 9-point text, about


def draw_grid(cells, *, rows, cols, path, title=None, cell_size: float = 2.5, dpi: int = 100,
              max_width: int | None = None, highlight=()) -> Path:
    """Draw `cells` as a grid (rows × cols by label), save PNG + JSON sidecar atomically; return the PNG path.

    A combined axis groups by its first label: cols=("lr", "step") draws each learning rate's steps side
    by side under one header, a little apart from the next rate's; rows=("prompt", "seed") names each
    prompt once for its seeds. `max_width` (pixels) shrinks the cells until the whole grid fits that width.
    `highlight` lists label dicts (e.g. {"run": "lr-1e-4", "step": 200}): every cell whose labels include
    one of them gets a coloured frame and its column a ★ (the suggested snapshot).

    Uses a bare matplotlib `Figure` (Agg canvas, never pyplot), so nothing pops up or stays open in a
    notebook; show the result with `IPython.display.Image(path)`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = list(cells)
    row_labels, col_labels, grid = layout(cells, rows, cols)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"path: {path} must end in .png.")
    highlight = [dict(h) for h in highlight]
    row_names, col_names = _axis(rows, "rows"), _axis(cols, "cols")
    row_groups, col_groups = _groups(row_labels, row_names), _groups(col_labels, col_names)
    inner_rows = [format_axis_label(row_names[1:] if len(row_names) > 1 else row_names, _inner(v, row_names))
                  for v in row_labels]
    inner_cols = [format_axis_label(col_names[1:] if len(col_names) > 1 else col_names, _inner(v, col_names))
                  for v in col_labels]
    marked = [[cell is not None and _matches(cell_labels(cell)[0], highlight) for cell in row] for row in grid]
    starred = [any(marked[i][j] for i in range(len(grid))) for j in range(len(col_labels))]

    # Sizes in inches: label column(s) on the left, header line(s) on top, then the cells.
    n_rows, n_cols = len(row_labels), len(col_labels)
    grouped_rows, grouped_cols = len(row_names) > 1, len(col_names) > 1
    longest = max(len(line) for text in inner_rows for line in text.split("\n"))
    left = (1.75 if grouped_rows else 0.0) + min(max(0.15 + _CHAR * longest, 0.5), 2.3)
    gaps_x = _positions(col_groups, 0.0, start=0.0, grouped=grouped_cols)[-1]
    gaps_y = _positions(row_groups, 0.0, start=0.0, grouped=grouped_rows)[-1]
    if max_width is not None:
        cell_size = min(cell_size, (max_width / dpi - left - 0.1 - gaps_x) / n_cols)
    cell_size = max(cell_size, 0.3)
    fontsize = 9 if cell_size >= 1.2 else 8
    inner_h = 0.17 * max(t.count("\n") + 1 for t in inner_cols) + 0.1
    outer_h = (0.17 * max(format_label(col_names[0], g[0], width=_chars(cell_size, len(g[1]))).count("\n") + 1
                          for g in col_groups) + 0.1) if grouped_cols else 0.0
    top = inner_h + outer_h + (0.4 if title else 0.05)
    width, height = left + n_cols * cell_size + gaps_x + 0.1, top + n_rows * cell_size + gaps_y + 0.05
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)

    xs = _positions(col_groups, cell_size, start=left, grouped=grouped_cols)
    ys = _positions(row_groups, cell_size, start=top, grouped=grouped_rows)

    def box(x, y, w, h):  # inches from the top left → figure fractions from the bottom left
        return [x / width, 1 - (y + h) / height, w / width, h / height]

    for i in range(n_rows):
        for j in range(n_cols):
            ax = fig.add_axes(box(xs[j], ys[i], cell_size, cell_size))
            _draw_cell(ax, grid[i][j], marked=marked[i][j])
    for j, text in enumerate(inner_cols):
        star = "★ " if starred[j] else ""
        fig.text((xs[j] + cell_size / 2) / width, 1 - (top - 0.04) / height, star + text, ha="center", va="bottom",
                 fontsize=fontsize, color=HIGHLIGHT if starred[j] else "black", weight="bold" if starred[j] else None)
    if grouped_cols:
        for value, members in col_groups:
            x0, x1 = xs[members[0]], xs[members[-1]] + cell_size
            y = top - inner_h - 0.02
            fig.text((x0 + x1) / 2 / width, 1 - y / height,
                     format_label(col_names[0], value, width=_chars(cell_size, len(members))),
                     ha="center", va="bottom", fontsize=fontsize + 1, weight="bold")
            fig.add_artist(_rule(fig, (x0 + 0.05) / width, (x1 - 0.05) / width, 1 - (y - 0.01) / height))
    for i, text in enumerate(inner_rows):
        fig.text((left - 0.08) / width, 1 - (ys[i] + cell_size / 2) / height, text, ha="right", va="center",
                 fontsize=fontsize)
    if grouped_rows:
        for value, members in row_groups:
            y = (ys[members[0]] + ys[members[-1]] + cell_size) / 2
            fig.text(0.08 / width, 1 - y / height, format_label(row_names[0], value, width=22), ha="left",
                     va="center", fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=fontsize + 3, y=1 - 0.08 / height, va="top")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    fig.clear()
    storage.atomic_write_bytes(path, buffer.getvalue())
    storage.write_json(path.with_suffix(".json"), sidecar(cells, rows=rows, cols=cols, title=title, png=path,
                                                          laid_out=(row_labels, col_labels, grid), highlight=highlight))
    return path


def _draw_cell(ax, cell, *, marked: bool) -> None:
    from PIL import Image

    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(marked)
        spine.set_edgecolor(HIGHLIGHT)
        spine.set_linewidth(3)
    if cell is None:
        ax.set_facecolor("#f0f0f0")
        ax.text(0.5, 0.5, "no image", ha="center", va="center", color="#888888", transform=ax.transAxes, fontsize=8)
        return
    image_path = cell_labels(cell)[1]
    try:
        with Image.open(image_path) as image:
            ax.imshow(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise DataError(f"{image_path}: cannot read this grid image ({err}); render it again.") from None


def _rule(fig, x0: float, x1: float, y: float):
    from matplotlib.lines import Line2D

    return Line2D([x0, x1], [y, y], transform=fig.transFigure, color="#555555", linewidth=0.8)


def _groups(labels: list, names: tuple[str, ...]) -> list[tuple]:
    """[(first label's value, [positions])] for runs of equal first values; one group per position when the
    axis has a single label (nothing to group)."""
    if len(names) == 1:
        return [(value, [i]) for i, value in enumerate(labels)]
    groups: list[tuple] = []
    for i, value in enumerate(labels):
        if groups and groups[-1][0] == value[0]:
            groups[-1][1].append(i)
        else:
            groups.append((value[0], [i]))
    return groups


def _inner(value, names: tuple[str, ...]):
    """The part of an axis label drawn beside each cell: all but the group's label on a combined axis."""
    if len(names) == 1:
        return value
    return value[1] if len(names) == 2 else tuple(value[1:])


def _positions(groups, cell: float, *, start: float, grouped: bool) -> list[float]:
    """Offsets (inches) of each position along an axis: cells `_GAP` apart, groups `_GROUP_GAP` apart."""
    out, at = [], start
    for g, (_, members) in enumerate(groups):
        for k in range(len(members)):
            if out:
                at += _GROUP_GAP if grouped and k == 0 else _GAP
            out.append(at)
            at += cell
    return out


def _chars(cell: float, span: int) -> int:
    """How many characters of a 9-point header fit across `span` cells of `cell` inches."""
    return max(8, int(span * cell / _CHAR))


def _matches(labels: dict, wanted: list[dict]) -> bool:
    return any(all(labels.get(k) == v for k, v in want.items()) for want in wanted)


def sidecar(cells, *, rows, cols, title=None, png=None, laid_out=None, highlight=()) -> dict:
    """What the grid shows, as JSON: axes, labels, every cell (row, col, labels, image) row-major, and the
    label sets it marks (`highlight`)."""
    row_labels, col_labels, grid = laid_out or layout(cells, rows, cols)
    entries = []
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            if cell is not None:
                labels, image = cell_labels(cell)
                entries.append({"row": i, "col": j, "labels": labels, "image": str(image)})

    def axis(names):
        return names if isinstance(names, str) else list(names)

    def values(labels):
        return [list(v) if isinstance(v, tuple) else v for v in labels]

    return {"title": title, "image": None if png is None else Path(png).name, "rows": axis(rows),
            "cols": axis(cols), "row_labels": values(row_labels), "col_labels": values(col_labels),
            "shape": [len(row_labels), len(col_labels)], "highlight": [dict(h) for h in highlight], "cells": entries}
