"""Model parallelism: a Llama split by layers across two processes gives the single-process logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimcart.errors import SlimcartError
from slimcart.runtime.pipeline import PipelineRunner, load_stage


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_a_stage_reads_only_its_layers(tiny_llama):
    folder, model = tiny_llama
    stage = load_stage(folder, 2, 4, first=False, last=True)
    assert len(stage.model.layers) == 2
    assert torch.equal(stage.model.layers[0].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    with pytest.raises(SlimcartError, match="do not fit a 4-layer model"):
        load_stage(folder, 3, 6, first=False, last=True)


def test_two_stage_logits_and_decoding_equal_one_process(tiny_llama):
    folder, model = tiny_llama
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    runner = PipelineRunner(folder, threads=1)
    try:
        got = runner({"input_ids": ids.numpy()})
        tokens = runner({"input_ids": ids[:1].numpy(), "max_new_tokens": 6})
    finally:
        runner.close()
    with torch.inference_mode():
        want = model(input_ids=ids).logits.numpy()
        ref = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), do_sample=False,
                             max_new_tokens=6, min_new_tokens=6, pad_token_id=0)[:, 9:].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(tokens, ref)
