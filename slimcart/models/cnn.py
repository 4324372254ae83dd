"""A small ResNet (He et al., 2016) for product photos, trained from scratch by slimcart.

Why a ResNet of BasicBlocks (dense 3x3 convs) rather than MobileNetV2:
- The compression targets are int8 static convs and channel pruning on CPU runtimes. A dense 3x3
  conv is a compute-bound GEMM that VNNI int8 kernels run several times faster than fp32; the
  depthwise convs that dominate MobileNetV2's latency are memory-bound (int8 gains little) and their
  per-channel weights lose accuracy under int8. Removing a fraction c of a dense conv's input and
  output channels cuts its work by ~(1 - c)^2; for a depthwise conv only by (1 - c).
- Residual additions and batch norm are exactly the coupling channel pruning has to honour, so the
  model exercises the pruning code the way real CNNs do.
- From scratch on ~3k photos a batch-norm ResNet trains stably in a few CPU-minutes; inverted
  residual networks need much longer schedules to reach the same accuracy.

Shape: stem conv3x3 stride 2 + BN + ReLU -> max-pool 3x3 stride 2 -> 4 stages of BasicBlocks
(strides 1, 2, 2, 2; a 1x1 conv + BN shortcut where stride or width changes) -> global average
pool -> dropout -> linear. Input `pixels`: float32 (N, 3, H, W), RGB in [0, 1]; the model subtracts
its stored mean and divides by its std itself, so every runtime is fed the same tensor.
Every conv width is read back from the weights on load, so a channel-pruned model round-trips
through config.json + model.safetensors without code changes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet channel statistics: product photos are ordinary RGB photographs, and a fixed, published
# normalisation keeps a user's own folder comparable with the trained model.
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@dataclass
class CNNConfig:
    """Model shape; JSON-serialisable. `widths[s]` is stage s's output width, `blocks[s]` its block count;
    `inner` (per block, flattened; None = the stage width) records the first conv's width after pruning."""

    classes: list[str]
    image_size: int = 96
    stem: int = 32
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    inner: list[int] | None = None
    dropout: float = 0.2
    mean: list[float] = field(default_factory=lambda: list(MEAN))
    std: list[float] = field(default_factory=lambda: list(STD))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CNNConfig:
        """Build from a config.json dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x)))))); shortcut = identity or 1x1 conv + BN."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, mid, 3, stride), conv_bn(mid, cout, 3, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.conv2(F.relu(self.conv1(x))))


class ResNet(nn.Module):
    """`pixels` (N, 3, H, W) float in [0, 1] -> class logits (N, len(classes))."""

    def __init__(self, config: CNNConfig, shortcuts: list[bool] | None = None):
        super().__init__()
        c = self.config = config
        n_blocks = sum(c.blocks)
        inner = c.inner or [w for w, b in zip(c.widths, c.blocks) for _ in range(b)]
        if len(inner) != n_blocks or len(c.widths) != len(c.blocks):
            raise ValueError(f"config widths/blocks/inner disagree: {c.widths}, {c.blocks}, {c.inner}")
        self.register_buffer("mean", torch.tensor(c.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, 3, 1, 1), persistent=False)
        self.stem = conv_bn(3, c.stem, 3, 2)
        blocks, cin, i = [], c.stem, 0
        for s, (width, count) in enumerate(zip(c.widths, c.blocks)):
            for b in range(count):
                stride = (2 if s > 0 else 1) if b == 0 else 1
                short = shortcuts[i] if shortcuts is not None else (stride != 1 or cin != width)
                blocks.append(BasicBlock(cin, inner[i], width, stride, short))
                cin, i = width, i + 1
        self.blocks = nn.Sequential(*blocks)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(cin, len(c.classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in blocks:  # zero-init the last BN of each residual branch: every block starts as identity
            nn.init.zeros_(blk.conv2[1].weight)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` is accepted and ignored so a labelled calibration batch can be fed as `module(**batch)`."""
        x = (pixels - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        x = self.blocks(x)
        return self.head(self.drop(x.mean((2, 3))))


def actual_config(model: ResNet) -> CNNConfig:
    """The config matching the module's current weights (after any channel pruning)."""
    c, blocks = model.config, list(model.blocks)
    widths, k = [], 0
    for count in c.blocks:
        k += count
        widths.append(blocks[k - 1].conv2[0].out_channels)
    return CNNConfig(**{**c.to_dict(), "stem": model.stem[0].out_channels, "widths": widths,
                        "inner": [b.conv1[0].out_channels for b in blocks]})


def build_from_state_dict(config: CNNConfig, state: dict[str, torch.Tensor]) -> ResNet:
    """Instantiate with widths and shortcuts taken from the weights themselves, then load strictly."""
    n = sum(config.blocks)
    inner = [int(state[f"blocks.{i}.conv1.0.weight"].shape[0]) for i in range(n)]
    outs = [int(state[f"blocks.{i}.conv2.0.weight"].shape[0]) for i in range(n)]
    ends = [sum(config.blocks[: s + 1]) - 1 for s in range(len(config.blocks))]
    cfg = CNNConfig(**{**config.to_dict(), "stem": int(state["stem.0.weight"].shape[0]),
                       "widths": [outs[e] for e in ends], "inner": inner})
    model = ResNet(cfg, shortcuts=[f"blocks.{i}.shortcut.0.weight" in state for i in range(n)])
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_cnn(model: ResNet, folder: Path, extra: dict | None = None) -> None:
    """Write model.safetensors + config.json into `folder` (which must exist)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(Path(folder) / "model.safetensors"))
    cfg = {"model_type": "slimcart-resnet", "model": actual_config(model).to_dict(), **(extra or {})}
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))


def load_cnn(folder: Path) -> tuple[ResNet, dict]:
    """Load a folder written by `save_cnn`; returns (module in eval mode, config.json dict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "slimcart-resnet" or "model" not in cfg:
        raise ValueError(f"{folder / 'config.json'} is not a slimcart CNN config (model_type != 'slimcart-resnet')")
    state = load_file(str(folder / "model.safetensors"))
    return build_from_state_dict(CNNConfig.from_dict(cfg["model"]), state), cfg


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
