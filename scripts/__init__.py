"""Runnable tools (install, example data, benchmarks); nothing here is imported by the library."""
