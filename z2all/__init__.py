"""z2all: train your own large language model from zero."""

__version__ = "0.1.0"
