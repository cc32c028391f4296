#!/usr/bin/env python3
"""Regenerate `notebooks/*.ipynb` from their jupytext `py:percent` sources (`notebooks/*.py`).

    python tools/sync_notebooks.py           # write every .ipynb whose content differs
    python tools/sync_notebooks.py --check   # exit 1 and name the notebooks that are out of date

The `.py` files are the sources: edit them, then run this. The generated notebooks have no outputs, no
widget state, no jupytext pairing (users' editors must not write files beside them), a `python3` kernelspec (so JupyterLab does not ask for a kernel), Colab metadata asking for
a GPU runtime, and stable cell ids (so regenerating an unchanged source gives the same bytes).
The check also verifies that jupytext writes each source back unchanged, so opening a paired notebook
in Jupyter never rewrites the `.py`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def sources(folder: Path = NOTEBOOKS) -> list[Path]:
    """The notebook sources: `NN_name.py` files in `folder`."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.py"))


def build(source: Path) -> str:
    """The .ipynb text for one py:percent source."""
    import jupytext
    import nbformat

    nb = jupytext.read(source, fmt="py:percent")
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = {
        "accelerator": "GPU",
        "colab": {"gpuType": "T4", "provenance": []},
        # No jupytext pairing here: a user with jupytext installed would otherwise get a stray .py written beside
        # every notebook on autosave. The pairing lives in the sources' header, for development only.
        "kernelspec": dict(KERNELSPEC),
        "language_info": {"name": "python"},
    }
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:02d}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags",)}
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def roundtrip_ok(source: Path) -> bool:
    """True if jupytext writes the source back byte for byte (pairing in Jupyter will not rewrite it)."""
    import jupytext

    text = source.read_text()
    again = jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="py:percent")
    # jupytext stamps its own version into the header (text_representation); that part may differ.
    again = re.sub(r"#     text_representation:\n(#       .*\n)+", "", again)
    return again == text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a notebook is out of date")
    parser.add_argument("--folder", type=Path, default=NOTEBOOKS)
    args = parser.parse_args(argv)
    stale, bad_sources = [], []
    found = sources(args.folder)
    if not found:
        print(f"No notebook sources (NN_name.py) in {args.folder}", file=sys.stderr)
        return 1
    for source in found:
        target = source.with_suffix(".ipynb")
        text = build(source)
        if not roundtrip_ok(source):
            bad_sources.append(source)
        if target.is_file() and target.read_text() == text:
            continue
        stale.append(target)
        if not args.check:
            target.write_text(text)
            print(f"wrote {target.relative_to(args.folder.parent)}")
    if args.check:
        for target in stale:
            print(f"out of date: {target.name} (run python tools/sync_notebooks.py)", file=sys.stderr)
        for source in bad_sources:
            print(f"not in jupytext's canonical py:percent form: {source.name} "
                  "(jupytext --to py:percent would rewrite it)", file=sys.stderr)
        return 1 if stale or bad_sources else 0
    for source in bad_sources:
        print(f"warning: jupytext would rewrite {source.name}; keep sources in canonical py:percent form",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
