"""`CausalLM`: a Hugging Face causal LM as a plain `forward(input_ids) -> logits` module (the model
itself stays reachable as `.model`, e.g. for `generate`)."""
from __future__ import annotations

import torch


class CausalLM(torch.nn.Module):
    """`forward(input_ids) -> logits` around a Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # No KV cache for plain scoring: nothing reuses it, and a cache-free graph exports cleanly.
        return self.model(input_ids=input_ids, use_cache=False).logits
