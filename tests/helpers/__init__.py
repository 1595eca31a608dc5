"""Test-only callbacks and a tiny feature extractor, importable by subprocess runs that put tests/ on PYTHONPATH."""
