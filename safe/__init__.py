"""SAFE: add audio to a frozen vision-language model without breaking it."""

__version__ = "0.1.0"
