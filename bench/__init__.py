"""The benchmark harness: ``python -m bench`` (see ``python -m bench --help``)."""
