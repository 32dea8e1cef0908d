"""INT8 / INT4 quantization of bundle stages and their accuracy reports."""
