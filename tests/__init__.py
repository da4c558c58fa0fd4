"""Test suite of synapse-fastjoin (a package so ``tests.harness`` is importable)."""
