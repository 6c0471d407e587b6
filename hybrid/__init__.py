"""hybrid-arch: build hybrid Mamba-3 / attention language models and search how to mix them."""

__version__ = "0.8.1"
