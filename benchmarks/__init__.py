"""Latency, RTF and memory benchmarks per hardware profile."""
