"""Model definitions that slimcart trains itself (rather than downloading)."""
from .sasrec import SASRec, SASRecConfig, load_sasrec, save_sasrec

__all__ = ["SASRec", "SASRecConfig", "load_sasrec", "save_sasrec"]
