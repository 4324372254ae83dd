"""Student builders: layer-dropped copies keep the chosen teacher layers and reload as ordinary models."""
import numpy as np
import pytest
import torch

from slimcart.compress.distill import students
from slimcart.errors import SlimcartError
from slimcart.workloads import get_workload


pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniform_layers():
    assert students.uniform_layers(6, 3) == [0, 2, 4]
    assert students.uniform_layers(30, 24)[:3] == [0, 1, 2] and len(students.uniform_layers(30, 24)) == 24


def test_bert_layer_drop_copies_layers_and_reloads(tmp_path, tiny_encoder_dir):
    wl = get_workload("search")
    teacher = wl.load_model(str(tiny_encoder_dir))
    student = students.drop_layers(teacher.module, [1])
    assert student.transformer.config.num_hidden_layers == 1
    assert teacher.module.transformer.config.num_hidden_layers == 2  # teacher untouched
    t_layer = teacher.module.transformer.encoder.layer[1]
    s_layer = student.transformer.encoder.layer[0]
    for (n, a), (_, b) in zip(t_layer.state_dict().items(), s_layer.state_dict().items()):
        assert torch.equal(a, b), n
    teacher.module = student
    wl.save_model(teacher, tmp_path / "s")
    again = wl.load_model(str(tmp_path / "s"))
    batch = wl.example_batch(again)
    np.testing.assert_allclose(wl.torch_runner(again)(batch), wl.torch_runner(teacher)(batch), atol=1e-6)


def test_llama_layer_drop_generates(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimcart.models.causal_lm import CausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    teacher = CausalLM(LlamaForCausalLM(cfg).eval())
    student = students.drop_layers(teacher, [0, 3])
    assert student.model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.model.layers] == [0, 1]
    ids = torch.tensor([[1, 2, 3, 4]])
    out = student.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # KV cache indices still valid
    assert out.shape == (1, 7)
    student.model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(ids).logits, student(ids))


def test_bad_layer_choices():
    from slimcart.models.sasrec import SASRec, SASRecConfig

    m = SASRec(SASRecConfig(n_items=10, hidden=8, heads=2, layers=2))
    with pytest.raises(SlimcartError, match="distinct teacher layers"):
        students.drop_layers(m, [0, 2])
    with pytest.raises(SlimcartError, match="distinct"):
        students.drop_layers(m, [1, 1])
    with pytest.raises(SlimcartError, match="knows the structure"):
        students.drop_layers(torch.nn.Linear(2, 2), [0])


def test_choose_layers_picks_the_best_measured_subset():
    from slimcart.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    m = SASRec(SASRecConfig(n_items=10, hidden=8, heads=2, layers=4))
    ids = {id(b): i for i, b in enumerate(m.blocks)}
    # score = prefer keeping layer 3: find it through weight identity of the copies
    w3 = m.blocks[3].fc1.weight

    def score(student):
        return float(any(torch.equal(b.fc1.weight, w3) for b in student.blocks))

    best, tried = students.choose_layers(m, 2, score)
    assert best[0] == 0 and 3 in best and len(tried) == 3  # subsets {0,1}, {0,2}, {0,3}
    assert ids  # layers of the teacher itself were never modified
    assert len(m.blocks) == 4


def test_narrow_sasrec_projects_embeddings():
    from slimcart.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    t = SASRec(SASRecConfig(n_items=50, hidden=16, heads=2, layers=2)).eval()
    s = students.narrow_sasrec(t, 0.5)
    assert s.item_emb.embedding_dim == 8 and [b.fc1.out_features for b in s.blocks] == [8, 8]
    assert torch.all(s.item_emb.weight[0] == 0)
    # the student's item-item similarities approximate the teacher's (top principal directions kept)
    te, se = t.item_emb.weight[1:].detach(), s.item_emb.weight[1:].detach()
    tc, sc = te - te.mean(0), se - se.mean(0)
    assert torch.corrcoef(torch.stack([(tc @ tc.T).flatten(), (sc @ sc.T).flatten()]))[0, 1] > 0.5
    with pytest.raises(SlimcartError, match="width"):
        students.narrow_sasrec(t, 0.01)


def test_narrow_by_structured_pruning():
    from slimcart.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    t = SASRec(SASRecConfig(n_items=50, hidden=16, heads=2, layers=2, dropout=0.0)).eval()
    s = students.narrow_structured(t, 0.5)  # magnitude criterion without batches
    assert s.item_emb.embedding_dim == 8 and [b.fc1.out_features for b in s.blocks] == [8, 8]
    assert t.item_emb.embedding_dim == 16  # the teacher is untouched
    seq = torch.tensor([[0, 3, 4, 5]])
    assert s(seq).shape == t(seq).shape
