"""`kvcompress eval`: perplexity and needle retrieval of specs on a model, against the full-precision baseline."""
