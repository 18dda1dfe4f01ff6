"""kvcompress-rvq: residual vector quantization of the KV cache (Kumar, arXiv 2410.15704)."""
