"""Hardware detection and per-device profiles (providers, threads, precisions, chunk sizes)."""
