"""charlm: find the best character-level language model for a text, tracked in MLflow."""

__version__ = "0.1.0"
