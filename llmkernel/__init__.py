"""LLM Kernel: raw text to a served, monitored and secured language model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmkernel")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
