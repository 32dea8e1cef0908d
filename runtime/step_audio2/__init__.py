"""Step-Audio 2 runtime stages (torch-free): the token2wav flow, whole or streamed."""
