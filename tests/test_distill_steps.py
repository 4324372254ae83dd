"""The `distill` recipe step end to end on tiny models, the built-in recipes, and bad input."""
import numpy as np
import pytest
import torch

from slimcart import api
from slimcart.contracts import ModelState, StepContext
from slimcart.errors import SlimcartError
from slimcart.recipe import Recipe, load_recipe, parse_step
from slimcart.workloads import get_workload


pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"max_steps": 6, "max_minutes": None, "batch_size": 8, "eval_every": 3, "lr": 1e-3}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))  # checkpoints stay in the test's folder


def test_distill_recipe_on_tiny_encoder(tmp_path, tiny_encoder_dir, synthetic_data):
    rec = Recipe(name="t", steps=[{"kind": "distill", "student": {"type": "layer_drop", "n_layers": 1, "selection": "measured"},
                                   "losses": {"embedding_cosine": 1, "listwise": 1, "hidden_mse": 1, "attention": 1,
                                              "value_relation": 1}, "freeze": ["*word_embeddings*"], "train": FAST}])
    torch.manual_seed(0)  # the tiny fixture has no pooler weights: HF initialises them randomly on load
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False, threads=1)
    notes = " ".join(m["notes"])
    assert "chosen by measurement" in notes and "6 steps" in notes
    wl = get_workload("search")
    again = wl.load_model(str(tmp_path / "out" / "model"))  # an ordinary HF folder, one layer
    assert again.module.transformer.config.num_hidden_layers == 1
    assert set(m["compressed"]["quality"]) == {"ndcg@10", "recall@10", "cosine"}
    ckpts = [p for p in (tmp_path / "home" / "distill").iterdir() if p.is_dir()]
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").exists()
    # the same recipe again reuses the finished distillation (and the measured layer choice)
    torch.manual_seed(0)
    m2 = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", overwrite=True, repeats=1, measure_rss=False,
                      threads=1)
    notes2 = " ".join(m2["notes"])
    assert "earlier run" in notes2 and "reused finished run" in notes2
    assert m2["compressed"]["quality"] == pytest.approx(m["compressed"]["quality"])


def test_distillation_improves_the_student(tmp_path, tiny_encoder_dir, synthetic_data):
    """Validation cosine to the teacher goes up with training (a test that can fail)."""
    from slimcart.workloads.search_distill import SearchDistillTask
    from slimcart.compress.distill import students, TrainConfig, fit

    wl = get_workload("search")
    b = wl.load_model(str(tiny_encoder_dir))
    data = wl.load_data(None)
    task = SearchDistillTask(b.module, students.drop_layers(b.module, [0]), b.tokenizer, data.calibration_texts, seed=0)
    task.student().transformer.embeddings.word_embeddings.weight.requires_grad_(False)
    before = task.validate()  # minus the listwise KL on held-out texts
    res = fit(task, TrainConfig(**{**FAST, "max_steps": 30, "eval_every": 10}))
    assert res.best_score > 0.5 * before  # the held-out ranking disagreement at least halves


def test_lowrank_then_recovery(tmp_path, tiny_encoder_dir, synthetic_data):
    wl = get_workload("search")
    b = wl.load_model(str(tiny_encoder_dir))
    ctx = StepContext(workload=wl, data=wl.load_data(None), workdir=tmp_path, threads=1)
    state = ModelState(bundle=b)
    state = parse_step({"kind": "lowrank", "targets": ["*encoder.layer.*"], "granularity": 4,
                                   "sensitivity": "spectrum"}).apply(state, ctx)
    teacher = state.teacher
    assert teacher is not None  # recipe unknown to the step context: a later distill may need it
    state = parse_step({"kind": "distill", "student": {"type": "current"}, "freeze": ["*word_embeddings*"],
                        "train": {**FAST, "max_steps": 8}}).apply(state, ctx)
    assert state.teacher is None and "distillation (current)" in state.notes[-1]
    assert state.reports["distill"]["best_score"] >= state.reports["distill"]["history"][0]["val"]
    from slimcart.compress.lowrank import factorized_ranks

    assert factorized_ranks(state.bundle.module)  # still factorized: recovery trains the factors
    assert teacher is not state.bundle.module


def test_recsys_narrow_student(tmp_path):
    from slimcart.workloads.recsys_distill import RecsysDistillTask
    from slimcart.compress.distill import students, TrainConfig, fit
    from slimcart.models.sasrec import SASRec, SASRecConfig

    wl = get_workload("recsys")
    data = wl.load_data(None)  # synthetic interactions
    torch.manual_seed(0)
    teacher = SASRec(SASRecConfig(n_items=data.n_items, max_len=10, hidden=16, heads=2, layers=1, dropout=0.0)).eval()
    task = RecsysDistillTask(teacher, students.narrow_sasrec(teacher, 0.5), data,
                             {"logits_kl": 1, "hidden_mse": 1, "task": 1}, temperature=2.0, negatives=16)
    res = fit(task, TrainConfig(**{**FAST, "max_steps": 4, "eval_every": 2}))
    assert res.steps == 4 and np.isfinite(res.best_score)
    assert task.student().item_emb.embedding_dim == 8
    wrong = SASRec(SASRecConfig(n_items=data.n_items + 5, max_len=10, hidden=8, heads=2, layers=1))
    with pytest.raises(SlimcartError, match="catalogue"):
        RecsysDistillTask(teacher, wrong, data)


def test_llm_token_kl_task():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimcart.workloads.llm_distill import LlmDistillTask
    from slimcart.compress.distill import students, TrainConfig, fit
    from slimcart.models.causal_lm import CausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    teacher = CausalLM(LlamaForCausalLM(cfg).eval())
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 64, (1, 16)) for _ in range(12)]
    task = LlmDistillTask(teacher, students.drop_layers(teacher, [0]), windows, {"logits_kl": 1, "task": 0.5})
    res = fit(task, TrainConfig(**{**FAST, "max_steps": 4, "batch_size": 2}))
    assert res.steps == 4
    other = CausalLM(LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "vocab_size": 80})))
    with pytest.raises(SlimcartError, match="vocabularies differ"):
        LlmDistillTask(teacher, other, windows)
    with pytest.raises(SlimcartError, match="empty"):
        LlmDistillTask(teacher, students.drop_layers(teacher, [0]), [])


def test_bad_distill_input(tmp_path, tiny_encoder_dir, synthetic_data):
    from transformers import BertConfig, BertModel

    from slimcart.workloads.search_distill import SearchDistillTask

    wl = get_workload("search")
    b = wl.load_model(str(tiny_encoder_dir))
    ctx = StepContext(workload=wl, data=wl.load_data(None), workdir=tmp_path, threads=1)
    with pytest.raises(SlimcartError, match="empty"):
        SearchDistillTask(b.module, b.module, b.tokenizer, [])
    with pytest.raises(SlimcartError, match="no loss"):
        SearchDistillTask(b.module, b.module, b.tokenizer, ["a", "b", "c", "d"], {"token_kl": 1})
    with pytest.raises(SlimcartError, match="needs an earlier step"):
        parse_step({"kind": "distill", "student": {"type": "current"}}).apply(ModelState(bundle=b), ctx)
    with pytest.raises(SlimcartError, match="n_layers must be"):
        parse_step({"kind": "distill", "student": {"n_layers": 2}}).apply(ModelState(bundle=b), ctx)
    # a user student with another vocabulary size: distillation on shared tokens is impossible
    other = tmp_path / "other"
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64), add_pooling_layer=False).save_pretrained(other)
    for f in tiny_encoder_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    step = parse_step({"kind": "distill", "student": {"type": "model", "path": str(other)}, "train": FAST})
    with pytest.raises(SlimcartError, match="vocabularies differ"):
        step.apply(ModelState(bundle=b), ctx)
    with pytest.raises(SlimcartError, match="world_size|greater"):
        parse_step({"kind": "distill", "train": {"world_size": 0}})


def test_builtin_recipes_parse():
    for name in ("distill-L3", "distill-L3-int8", "lowrank-50", "distill-recsys-half", "distill-llm-L24"):
        rec = load_recipe(name)
        assert rec.steps and rec.description
