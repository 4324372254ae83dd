"""slimcart: compress and accelerate e-commerce models (search, recsys, llm) with measured results."""
import os as _os

# slimcart loads models from local folders and packages only; never reach for a model hub.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
