"""tests/, tests/workers, tools/ and examples/length_bias are on the import path through pytest's
``pythonpath`` setting (pyproject.toml); the shared helpers are tests/helpers.py."""
