"""`kvcompress eval`: perplexity, needle retrieval and RULER-style long-context tasks of specs on a model, against
the full-precision baseline.

One module per job: text (the texts read), perplexity (the protocol, its NLL and rows), needle (the needle
task), ruler_tasks and ruler (the RULER-style tasks and their run), generation (prompts and every runner's greedy
replies), runners (the baseline's and each spec's cache), footprint (the bytes and bits a cache holds), report
(tables, run header, progress), plot (--plot), lists (comma-separated options) and command (the command's
arguments and run).
"""
