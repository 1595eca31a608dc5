"""Test-only callbacks, a tiny feature extractor and the official layouts; subprocess runs that put tests/ on
PYTHONPATH import them too."""
