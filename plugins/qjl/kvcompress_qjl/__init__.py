"""kvcompress-qjl: the QJL key quantizer (arXiv 2406.03482) and its sketch-space score estimator."""
