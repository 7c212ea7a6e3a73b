"""Per-family configuration read from a model directory's JSON files (torch-free): the checks a
checkpoint must pass before any process starts, and the family's geometry and defaults that
the worker's model and the tokenizer's processor both read. One module per family; the
architecture table (common/architectures.py) names each architecture's checker."""

from __future__ import annotations


class FamilyConfigError(ValueError):
    """A checkpoint of the family that Fovea cannot serve (one line, naming the reason or the
    fix). Each family's checker raises its own subclass; common/model_config.py prefixes the
    config.json path."""
