"""dsv3c: a compiler for DeepSeek-V3-family models."""

__version__ = "0.1.0"
