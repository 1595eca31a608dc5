"""Test-only Lightning callbacks, importable by subprocess runs that put tests/ on PYTHONPATH."""
