"""A model library of our own, written the way timm-style vision libraries write theirs: classes
outside reconfx with their own constructor signatures (arguments not kept as attributes, layer
classes passed as arguments, settings objects), torch.nn subclasses with extra children, and the
block families whose emitted source once failed its parity check. Referenced by factory path from
the emission tests (tests/test_emit_library.py)."""

from __future__ import annotations

import dataclasses
import enum

import torch
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation child, chosen by a class argument that is not kept
    (timm's BatchNormAct2d): rebuilt from its own attributes alone it gets the default ReLU."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: type[nn.Module] = nn.ReLU):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor; its argument is not kept under its name
    (``normalized_shape`` holds it)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                 act_layer: type[nn.Module] = nn.ReLU, apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = BatchNormAct2d(cout, act_layer=act_layer, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation with a hard-sigmoid gate and a hard-swish reduction activation."""

    def __init__(self, channels: int, rd_ratio: float = 0.25,
                 act_layer: type[nn.Module] = nn.Hardswish,
                 gate_layer: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        reduced = max(1, int(channels * rd_ratio))
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)


class RepConv(nn.Module):
    """A re-parameterisable block (RepVGG-style): 3x3 and 1x1 conv branches plus a BatchNorm
    identity branch while training; ``reparameterize()`` folds them into one conv, after which
    the instance no longer matches what its constructor builds."""

    def __init__(self, channels: int, act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv_kxk = ConvNormAct(channels, channels, 3, apply_act=False)
        self.conv_1x1 = ConvNormAct(channels, channels, 1, apply_act=False)
        self.identity = BatchNormAct2d(channels, apply_act=False)
        self.reparam_conv: nn.Conv2d | None = None
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        return self.act(self.conv_kxk(x) + self.conv_1x1(x) + self.identity(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        channels = self.identity.num_features
        kernel = torch.zeros(channels, channels, 3, 3)
        bias = torch.zeros(channels)
        identity = torch.zeros(channels, channels, 3, 3)
        identity[range(channels), range(channels), 1, 1] = 1
        for weight, bn in ((self.conv_kxk.conv.weight, self.conv_kxk.bn),
                           (nn.functional.pad(self.conv_1x1.conv.weight, [1, 1, 1, 1]),
                            self.conv_1x1.bn), (identity, self.identity)):
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            kernel += weight * scale.view(-1, 1, 1, 1)
            bias += bn.bias - bn.running_mean * scale
        self.reparam_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.reparam_conv.weight.copy_(kernel)
        self.reparam_conv.bias.copy_(bias)
        del self.conv_kxk, self.conv_1x1, self.identity


class ZeroInitBlock(nn.Module):
    """A residual block whose last norm starts at zero scale (timm's ``zero_init_last``) and has
    no activation: at those weights its activation child cannot be told from any other, so only
    a parity check with other weights catches a rebuild that gets it wrong."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels)
        self.se = SqueezeExcite(channels)
        self.conv2 = ConvNormAct(channels, channels, apply_act=False)
        nn.init.zeros_(self.conv2.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(self.se(self.conv1(x))))


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class WindowAttention(nn.Module):
    """Attention within square windows with a learned relative-position bias table, indexed
    through a buffer computed in ``__init__`` that is not saved with the weights."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            0.02 * torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.window
        tokens = x.view(b, c, h // n, n, w // n, n).permute(0, 2, 4, 3, 5, 1).reshape(-1, n * n, c)
        q, k, v = self.qkv(tokens).view(-1, n * n, 3, self.heads, c // self.heads).unbind(2)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n * n, n * n, self.heads).permute(2, 0, 1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (c // self.heads) ** -0.5 + bias
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(-1, n * n, c)
        out = self.proj(out).view(b, h // n, w // n, n, n, c)
        return x + out.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


@dataclasses.dataclass
class MixerSettings:
    """A settings object a block takes instead of plain arguments (HF modules take a config)."""

    width: int
    expansion: int = 2
    layer_scale: float = 1e-2


class ScaledMixer(nn.Module):
    """A leaf built from a settings object: it owns its layer scale and builds its weights
    directly."""

    def __init__(self, settings: MixerSettings):
        super().__init__()
        self.settings = settings
        hidden = settings.width * settings.expansion
        self.w_in = nn.Parameter(torch.randn(hidden, settings.width) * 0.1)
        self.w_out = nn.Parameter(torch.randn(settings.width, hidden) * 0.1)
        self.gamma = nn.Parameter(torch.full((settings.width, 1, 1), settings.layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bchw,dc->bdhw", x, self.w_in).relu()
        return x + self.gamma * torch.einsum("bdhw,cd->bchw", h, self.w_out)


class ParsedScale(nn.Module):
    """A leaf whose constructor parses a string it does not keep (``"8x2"``): no call rebuilds
    it from its attributes, so model.py restores it from its recorded state."""

    def __init__(self, layout: str):
        super().__init__()
        self.width, self.groups = (int(v) for v in layout.split("x"))
        self.scale = nn.Parameter(torch.ones(self.width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.groups


class LibraryNet(nn.Module):
    """A two-task network assembled from the library's blocks (about 40k parameters)."""

    def __init__(self, width: int = 16, reparameterized: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), LayerNorm2d(width))
        self.stem_act = BatchNormAct2d(width, act_layer=nn.Hardswish)
        self.reps = nn.Sequential(RepConv(width), RepConv(width, act_layer=nn.SiLU))
        if reparameterized:
            self.reps[0].reparameterize()
        self.block = ZeroInitBlock(width)
        self.attention = WindowAttention(width, heads=2, window=4)
        self.mixer = ScaledMixer(MixerSettings(width))
        self.scale = ParsedScale(f"{width}x2")
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 3), "b": nn.Linear(width, 4)})

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem_act(self.stem(image))
        x = self.scale(self.mixer(self.attention(self.block(self.reps(x)))))
        pooled = x.mean((2, 3))
        return {name: head(pooled) for name, head in self.heads.items()}


class RepStack(nn.Module):
    """A re-parameterised block inside a Sequential the surgery leaves untouched: the only
    module restored from its state is nested in the Sequential's constructor call."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), RepConv(width))
        self.body[1].reparameterize()
        self.neck = nn.Linear(width, width)
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Linear(width, 2)})

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.neck(self.body(image).mean((2, 3)))
        return {name: head(h) for name, head in self.heads.items()}


class Layout(str, enum.Enum):
    """A setting that is a str and an enum member at once (timm's ``Format``)."""

    NCHW = "NCHW"
    NHWC = "NHWC"


class SplitScales(nn.Module):
    """Res2Net's multi-scale block: the channels split into groups, a ModuleList of convs
    applied to them in a loop. With the stem and one conv in the middle of the list branched,
    the shared convs of the loop run as one stream-batched region and the branched one after
    it, so the list's items are first used out of index order."""

    def __init__(self, width: int = 4, scales: int = 4):
        super().__init__()
        self.width = width
        self.stem = nn.Conv2d(3, width * scales, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1)
                                   for _ in range(scales))
        self.a = nn.Linear(width * scales, 3)
        self.b = nn.Linear(width * scales, 4)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(torch.relu(self.stem(image)), self.width, 1)
        x = torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1).mean((2, 3))
        return {"a": self.a(x), "b": self.b(x)}


class GeluLike(nn.Module):
    """An activation without parameters outside torch.nn: traced through, so no call of it is
    recorded and the Sequential holding it has a gap in the items the graph calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GappedMixer(nn.Module):
    """timm's RDNet block in miniature: a Sequential whose activation is traced through."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(width, width, 1), nn.GroupNorm(1, width),
                                    nn.Conv2d(width, 2 * width, 1), GeluLike(),
                                    nn.Conv2d(2 * width, width, 1))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(xs, 1)
        return x + self.layers(x)



class DenseLayer(nn.Module):
    """DenseNet's bottleneck layer: BN-ReLU-1x1 conv, BN-ReLU-3x3 conv, growing the features."""

    def __init__(self, channels: int, growth: int = 8, width: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, width * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width * growth)
        self.conv2 = nn.Conv2d(width * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.norm2(y)))], 1)


class DenseNetLike(nn.Module):
    """A small DenseNet: a stem, two dense blocks of three layers with a transition between,
    and two classification heads."""

    def __init__(self, growth: int = 8, classes: tuple[int, int] = (10, 10)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        c = 16
        blocks: list[nn.Module] = []
        for i in range(2):
            layers = []
            for _ in range(3):
                layers.append(DenseLayer(c, growth))
                c += growth
            blocks.append(nn.Sequential(*layers))
            if i == 0:
                blocks.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
                                            nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)))
                c //= 2
        self.features = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(c)
        self.left, self.right = nn.Linear(c, classes[0]), nn.Linear(c, classes[1])

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.norm(self.features(self.stem(image)))).mean((2, 3))
        return {"left": self.left(h), "right": self.right(h)}
