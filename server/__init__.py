"""Cached, low-latency model inference server: GPT-2 generation and sentiment, micro-batched."""

__version__ = "0.1.0"
