"""hetinfer: sparse, tiered LLM inference."""
__version__ = "0.1.0"
