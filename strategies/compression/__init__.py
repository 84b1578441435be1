"""Gradient-compression strategies: ddp whose buckets are combined through a
compressor (powersgd, terngrad, int8, topk, adaptive). See docs/compression.md."""
from strategies.compression import adaptive, int8, powersgd, terngrad, topk  # noqa: F401  (register)
from strategies.compression.base import Compressed, Compressor, Wire

__all__ = ["Compressed", "Compressor", "Wire"]
