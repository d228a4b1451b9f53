"""memray: fine-tuning sweeps on Ray that measure how much a language model memorizes."""

__version__ = "0.1.0"
