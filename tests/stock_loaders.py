"""Load model folders with the ecosystem's own loaders only (never slimcart) and embed texts.

Run as a separate process by tests/test_stock_loaders.py:  python stock_loaders.py JOBS.json OUT_DIR
JOBS.json: {"texts": [...], "jobs": [{"name": str, "folder": str, "loader": str}, ...]}. For each job it
writes OUT_DIR/<name>.npy (embeddings) or records the loader's error; OUT_DIR/results.json lists both.
Loaders:
  st, st-onnx, st-openvino  sentence_transformers.SentenceTransformer(folder, backend=torch|onnx|openvino)
  hf                        transformers.AutoModel + the pooling the folder's sentence-transformers files name
  onnxruntime, openvino     the graph under onnx/ or openvino/ run by the plain runtime, same pooling
  onnx-in-openvino          onnx/model.onnx read by OpenVINO (for graphs of standard ONNX ops only)
Pooling is read from 1_Pooling/config.json and modules.json (Normalize) as any user would.
"""
import json
import sys
from pathlib import Path

import numpy as np

BATCH = 32


def st_config(folder: Path) -> tuple[str, bool, int]:
    pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
    mode = next(k for k in ("cls_token", "max_tokens", "mean_tokens", "lasttoken") if pool.get(f"pooling_mode_{k}"))
    modules = json.loads((folder / "modules.json").read_text())
    normalize = any(m["type"].endswith("Normalize") for m in modules)
    max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    return mode, normalize, max_len


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    if mode == "cls_token":
        emb = hidden[:, 0]
    elif mode == "max_tokens":
        emb = np.where(m > 0, hidden, -np.inf).max(1)
    elif mode == "lasttoken":
        emb = hidden[np.arange(len(hidden)), mask.sum(1) - 1]
    else:
        emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True) if normalize else emb


def plain(folder: Path, texts: list[str], loader: str) -> np.ndarray:
    from transformers import AutoTokenizer

    mode, normalize, max_len = st_config(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if loader == "onnxruntime":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        run = lambda feed: sess.run(["last_hidden_state"], feed)[0]
    elif loader in ("openvino", "onnx-in-openvino"):
        import openvino as ov

        graph = folder / "openvino" / "openvino_model.xml" if loader == "openvino" else folder / "onnx" / "model.onnx"
        compiled = ov.Core().compile_model(str(graph), "CPU")
        names = {i.get_any_name() for i in compiled.inputs}
        run = lambda feed: compiled(feed)["last_hidden_state"]
    else:  # hf
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(folder)).eval()
        names = {"input_ids", "attention_mask", "token_type_ids"}

        def run(feed):
            with torch.no_grad():
                return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    out = []
    for a in range(0, len(texts), BATCH):
        enc = tok(texts[a : a + BATCH], padding=True, truncation=True, max_length=max_len, return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        out.append(pool(np.asarray(run(feed)), enc["attention_mask"], mode, normalize))
    return np.concatenate(out).astype(np.float32)


def embed(folder: Path, texts: list[str], loader: str) -> np.ndarray:
    if loader.startswith("st"):
        from sentence_transformers import SentenceTransformer

        backend = {"st": "torch", "st-onnx": "onnx", "st-openvino": "openvino"}[loader]
        model = SentenceTransformer(str(folder), device="cpu", backend=backend)
        return np.asarray(model.encode(texts, batch_size=BATCH, convert_to_numpy=True), dtype=np.float32)
    return plain(folder, texts, loader)


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    results = {}
    for job in spec["jobs"]:
        try:
            np.save(out / f"{job['name']}.npy", embed(Path(job["folder"]), spec["texts"], job["loader"]))
            results[job["name"]] = {"ok": True}
        except Exception as e:  # a loader's refusal is a result here, not a crash
            results[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    results["_slimcart_imported"] = any(m == "slimcart" or m.startswith("slimcart.") for m in sys.modules)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
