"""Everything of the core that knows about transformers: the compressed cache, the attention function that
reads it, model patching, and model loading (hf.loading). Importing kvcompress alone never imports this package."""
