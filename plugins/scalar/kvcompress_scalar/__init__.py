"""kvcompress-scalar: scalar quantizers (KIVI min/max, Lloyd-Max, fp8) and the randomized Hadamard transform."""
