"""ctgen: text-to-CT models (tokenizer, generator, super-resolution), sampling and metrics."""

from ctprep import __version__

__all__ = ["__version__"]
