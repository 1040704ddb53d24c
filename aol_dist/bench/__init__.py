"""Benchmarks behind ``aol bench``."""
