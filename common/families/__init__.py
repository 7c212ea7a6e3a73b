"""Per-family configuration read from a model directory's JSON files (torch-free): the checks a
checkpoint must pass before any process starts, and the family's geometry and defaults that
the worker's model and the tokenizer's processor both read. One module per family; the
architecture table (common/architectures.py) names each architecture's checker."""
