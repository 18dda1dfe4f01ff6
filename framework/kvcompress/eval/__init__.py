"""`kvcompress eval`: perplexity and needle retrieval of specs on a model, against the full-precision baseline.

One module per job: text (the texts read), perplexity (the protocol, its NLL and rows), needle (the needle
task), runners (the baseline's and each spec's cache), footprint (the bytes and bits a cache holds), report
(tables, run header, progress) and command (the command's arguments and run).
"""
