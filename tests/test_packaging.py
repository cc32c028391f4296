"""The two ways to install agree: pyproject.toml (pip, Colab, Kaggle, CI) and environment.yml (local conda)."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_lists_the_dependencies_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    assert [d for d in pip if d != "-e ."] == project["dependencies"]
    assert "-e ." in pip  # the package from the checkout, in that environment's pip
    assert "torch" in pip and not any(d.startswith("torch") and d != "torch" for d in pip)  # never pinned
    assert "ipywidgets>=7.7" in pip  # Colab still ships ipywidgets 7
