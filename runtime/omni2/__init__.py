"""LLaMA-Omni2 runtime stages (torch-free): TTS writer, chunked flow, HiFT stream, and the pipeline."""
