"""omnilite: run end-to-end speech-language models on edge hardware.

The runtime (`omnilite.runtime`) is torch-free; exporting checkpoints (`omnilite.export`) needs
the `export` extra.
"""

__version__ = "0.1.0"
