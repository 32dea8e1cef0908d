"""Fun-Audio-Chat runtime stages (torch-free)."""
