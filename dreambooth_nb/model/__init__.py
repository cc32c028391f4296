"""The base model: its family, the method that trains it, loading its parts, single files in, snapshots."""
