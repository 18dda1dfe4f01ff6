"""Everything of the core that knows about transformers: the compressed cache, the attention function that
reads it, and model patching. Importing kvcompress alone never imports this package."""
