"""The base model: its family, the method that trains it, loading its parts, single files in, snapshots."""

from pathlib import Path

KNOWN_MODELS = Path(__file__).parent / "known_models"
"""The configs (no weights) of the base models people start from, so that their family, parameter counts
and memory plan are known offline and before any download."""
