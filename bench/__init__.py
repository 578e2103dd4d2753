"""Benchmarks (not run by the test suite); each writes its numbers into docs/benchmarks.md by hand."""
