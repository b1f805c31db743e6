"""Smoke tests of benchmarks/ (the repository's benchmark scripts, run --quick)."""
