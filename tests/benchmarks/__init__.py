"""Tests of the benchmark scripts and their harness (a package, so that its
``conftest.py`` and test modules do not clash by name with ``tests/``'s)."""
