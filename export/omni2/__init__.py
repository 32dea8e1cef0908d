"""LLaMA-Omni2 export: official-layout loader, make-tiny writer, reference PyTorch stages, exporters, parity."""
