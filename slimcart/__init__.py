"""slimcart: compress and accelerate e-commerce models (search, recsys, llm) with measured results."""

__version__ = "0.1.0"
