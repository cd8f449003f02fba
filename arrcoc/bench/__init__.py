"""Benchmarks: commands that measure (speed, memory, accuracy) and write results files."""
