"""kvcompress-prune: pruning methods for kvcompress (ThinK key channels)."""
