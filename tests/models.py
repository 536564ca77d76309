"""Models for the tests, referenced by factory path from test specs: small architectures that
exercise one feature each (weight tying, learned tokens with attention, an LSTM, glue reading
``self.training``, a single-task backbone), and models and data that once broke or must fail
clearly."""

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class DataDependent(nn.Module):
    """Python control flow on tensor values at the top level: neither tier can trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = h * 2
        return {"a": h, "b": -h}


class SingleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def raising_factory(width: int = 4):
    raise ValueError(f"width {width} is not supported")


class InPlaceOnShared(nn.Module):
    """Adds a per-task branch into the shared tensor in place (``skip += branch``)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

    def forward(self, x):
        skip = self.trunk(x)
        out = self.branch(skip)
        skip += out
        skip.mul_(0.5)
        return {name: head(skip) for name, head in self.heads.items()}


class ThreeTasks(torch.utils.data.Dataset):
    """MultiDigits with three targets: the left digit, the right digit and their sum mod 10."""

    def __init__(self, split: str, seed: int, **kwargs):
        from reconfx.data import multidigits

        self.base = multidigits(split, seed, **kwargs)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        inputs, y = self.base[index]
        return inputs, {"a": y["left"], "b": y["right"], "c": (y["left"] + y["right"]) % 10}


class SingularValues(nn.Module):
    """Glue with an op no ONNX exporter translates (torch.linalg.svdvals)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.p = nn.Linear(6, 2)
        self.q = nn.Linear(6, 2)

    def forward(self, x):
        values = torch.linalg.svdvals(self.fc(x).view(-1, 2, 3))
        h = torch.cat([values, values, values], -1)
        return {"p": self.p(h), "q": self.q(h)}


class PoisonedDigits(torch.utils.data.Dataset):
    """MultiDigits whose item ``bad`` has a NaN pixel."""

    def __init__(self, split: str, seed: int, bad: int = 5, **kwargs):
        from reconfx.data import multidigits

        self.base, self.bad = multidigits(split, seed, **kwargs), bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        inputs, targets = self.base[index]
        if index == self.bad:
            inputs = {"image": inputs["image"].clone()}
            inputs["image"][0, 3, 3] = float("nan")
        return inputs, targets


class DigitsMLP(nn.Module):
    """A small MLP on MultiDigits images. ``detach_right``: task 'right' reads ``mid`` through
    ``.detach()``, so the graph shares ``mid`` but no gradient of 'right' reaches it.
    ``sqrt``: the trunk adds ``sqrt(0 * h)``, zero in value, whose gradient is 0 × ∞ = NaN."""

    def __init__(self, detach_right: bool = False, sqrt: bool = False):
        super().__init__()
        self.detach_right, self.sqrt = detach_right, sqrt
        self.trunk = nn.Linear(144, 32)
        self.mid = nn.Linear(32, 32)
        self.left = nn.Linear(32, 10)
        self.right = nn.Linear(32, 10)

    def forward(self, image):
        h = torch.relu(self.trunk(image.flatten(1)))
        if self.sqrt:
            h = h + torch.sqrt(h * 0)
        g = torch.relu(self.mid(h))
        right = g.detach() + h if self.detach_right else g
        return {"left": self.left(g), "right": self.right(right)}


class FailingOnRank(torch.utils.data.Dataset):
    """MultiDigits whose items raise on the rank named by ``rank`` (under torchrun)."""

    def __init__(self, split: str, seed: int, rank: int = 1, **kwargs):
        import os

        from reconfx.data import multidigits

        self.base = multidigits(split, seed, **kwargs)
        self.fail = os.environ.get("RANK") == str(rank)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        if self.fail:
            raise ValueError(f"item {index} is corrupt on this machine")
        return self.base[index]


class BatchMixing(nn.Module):
    """Shared layers after the branch point, one of whose glue ops mixes samples (a softmax over
    the batch axis): stream batching must leave that op per stream."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc3 = nn.Linear(dim, dim)
        self.fc4 = nn.Linear(dim, dim)
        self.out_a = nn.Linear(dim, 2)
        self.out_b = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(torch.relu(self.fc2(self.fc1(x))))
        h = self.fc3(h) * h.softmax(0)
        h = self.fc4(torch.relu(h))
        return {"a": self.out_a(h), "b": self.out_b(h)}


class WideShared(nn.Module):
    """A stem and one wide shared layer after it (4 MiB of weights, more than stream batching's
    intermediate-value budget): branching the stem leaves the wide layer to every stream."""

    def __init__(self, dim: int = 1024):
        super().__init__()
        self.stem = nn.Linear(16, dim)
        self.wide = nn.Linear(dim, dim)
        self.out_a = nn.Linear(dim, 2)
        self.out_b = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.nn.functional.gelu(self.wide(torch.relu(self.stem(x))))
        return {"a": self.out_a(h), "b": self.out_b(h)}


class ContextRegions(nn.Module):
    """Ops under ``torch.autocast`` and ``torch.no_grad``, which torch.export wraps in
    higher-order ops (as in Llama's rotary embedding)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc1(x)
        with torch.no_grad():
            gate = torch.sigmoid(h * self.scale)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = h @ self.fc2.weight.t()
        h = torch.relu(self.fc2(h * gate) + low.float())
        return {"a": self.a(h), "b": self.b(h)}


class NoGradGate(nn.Module):
    """A gate computed under ``torch.no_grad()``: fx traces it without the block (so fc2 would
    train), which the tracing check catches, and tier 2 keeps it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc1(x)
        with torch.no_grad():
            gate = torch.sigmoid(self.fc2(h))
        h = h * gate
        return {"a": self.a(h), "b": self.b(h)}


class LayerScale(nn.Module):
    """A parameter scaling a shared layer's output through a view (PoolFormer's layer scale):
    with fc branched, the batched region after it gets the view as an input, and under
    ``torch.no_grad`` that view requires grad but has no gradient edge."""

    def __init__(self):
        super().__init__()
        self.fc, self.mix = nn.Linear(6, 8), nn.Linear(8, 8)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.mix(self.fc(x)) * self.gamma.unsqueeze(0)
        return {"a": self.a(h), "b": self.b(h)}


@dataclass
class Settings:
    width: int = 8


class Rotary(nn.Module):
    """A leaf built from a settings object (like HF's rotary embeddings from their config): its
    constructor call has no source form."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.register_buffer("freq", torch.linspace(0.1, 1.0, settings.width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * torch.cos(self.freq)


class Configured(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.rotary = nn.Linear(6, 8), Rotary(Settings(8))
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.rotary(self.fc(x))
        return {"a": self.a(h), "b": self.b(h)}


class PowerLeaf(nn.Module):
    """A leaf holding a function made at run time: it has no source form, so neither a
    constructor call nor restoring rebuilds it, and model.py writes its traced code."""

    def __init__(self, power: int):
        super().__init__()
        self.fn = lambda h: h**power
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h) * self.scale


class BranchingPowerLeaf(PowerLeaf):
    """PowerLeaf whose forward branches on a tensor's value: fx cannot trace it either, so
    model.py cannot be written: the compile stops, naming it."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if bool(h.sum() > 0):
            return self.fn(h) * self.scale
        return self.fn(h) * -self.scale


class WithPowerLeaf(nn.Module):
    def __init__(self, branching: bool = False):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.power = (BranchingPowerLeaf if branching else PowerLeaf)(2)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.power(self.fc(x))
        return {"a": self.a(h), "b": self.b(h)}


class OffsetPositions(nn.Embedding):
    """OPT's positional embedding: called with the attention mask, it derives the positions
    from it unless given ``position_ids``; its own ops read only the positions."""

    def __init__(self, positions: int, dim: int):
        super().__init__(positions + 2, dim)

    def forward(self, mask: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.cumsum(mask, dim=1) - 1
        return super().forward(position_ids + 2)


class PositionsFromMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.positions = nn.Embedding(50, 8), OffsetPositions(64, 8)
        self.fc = nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = torch.ones_like(ids)
        positions = torch.cumsum(mask, dim=1) - 1
        h = self.fc(self.embed(ids) + self.positions(mask, position_ids=positions)).mean(1)
        return {"a": self.a(h), "b": self.b(h)}


class GraphNamed(nn.Module):
    """A top-level submodule named like a GraphModule attribute (a GNN's ``graph`` encoder)."""

    def __init__(self):
        super().__init__()
        self.graph, self.meta = nn.Linear(4, 8), nn.Linear(4, 8)
        self.head_a, self.head_b = nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.graph(x) + self.meta(x)
        return {"a": self.head_a(h), "b": self.head_b(h)}


class DoubleNet(nn.Module):
    """Layers in float64 (a model moved with ``.double()``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.mid = nn.Linear(5, 7), nn.Linear(7, 7)
        self.a, self.b = nn.Linear(7, 1), nn.Linear(7, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.mid(torch.relu(self.fc(x))))
        return {"a": self.a(h), "b": self.b(h)}


class DefaultScale(nn.Module):
    """A forward argument the spec does not give, used with its default value."""

    def __init__(self):
        super().__init__()
        self.fc, self.mid = nn.Linear(4, 8), nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> dict[str, torch.Tensor]:
        h = self.mid(torch.relu(self.fc(x)) * scale)
        return {"a": self.a(h), "b": self.b(h)}


def broken_split(split: str, seed: int, broken: str = "val", how: str = "empty", **kwargs):
    """MultiDigits with one split broken: ``empty``, an ``iterable`` dataset, ``tuples`` (items
    as bare tuples of tensors instead of (inputs, targets) dicts) or ``float64`` images."""
    from reconfx.data import multidigits

    base = multidigits(split, seed, **kwargs)
    if split != broken:
        return base
    if how == "empty":
        return torch.utils.data.Subset(base, [])
    if how == "iterable":
        return IterableDigits(base)
    if how == "float64":
        return [({"image": x["image"].double()}, y) for x, y in (base[i] for i in range(4))]
    return [(x["image"], y["left"], y["right"]) for x, y in (base[i] for i in range(4))]


class IterableDigits(torch.utils.data.IterableDataset):
    def __init__(self, base):
        self.base = base

    def __iter__(self):
        return iter(self.base[i] for i in range(len(self.base)))


class CallBlock(nn.Module):
    """A block taking a mask, a keyword-only constant and a default it is not given, and
    returning a tuple (like a transformer layer)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float = 1.0,
                cache: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(self.fc(x) * scale)
        if mask is not None:
            y = y * mask
        return y, y.mean(-1)


class Pair(nn.Module):
    """Takes two tensors; called on two equal values, which argument is which cannot be told
    from the values, so the call stays written out."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a) - b


class CallNet(nn.Module):
    """Three blocks on a chain; the last one's two outputs feed the heads."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([CallBlock(width) for _ in range(3)])
        self.pair = Pair(width)
        self.a, self.b = nn.Linear(width, 2), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = (x > -100).float()
        h = self.pair(x, x * 1.0)
        for i, block in enumerate(self.blocks):
            h, summary = block(h, mask, scale=0.5 * (i + 1))
        z = h + summary.unsqueeze(-1)
        return {"a": self.a(z), "b": self.b(z)}


class ScaleShift(nn.Module):
    """A leaf (it owns its parameter) whose forward has defaults its caller spells out."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None, *,
                scale: float = 1.0, clamp: bool = False) -> torch.Tensor:
        y = x * self.weight * scale + (0.0 if shift is None else shift)
        return y.clamp(-1, 1) if clamp else y


class DefaultsNet(nn.Module):
    """Calls its leaf with every argument named, most of them at their defaults, as Hugging Face
    models call their embeddings."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = ScaleShift(width)
        self.a, self.b = nn.Linear(width, 2), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(x=self.fc(x), shift=None, scale=1.0, clamp=False)
        h = self.norm(h, None, scale=2.0, clamp=False)
        return {"a": self.a(h), "b": self.b(h)}


class ChainNet(nn.Module):
    """Four blocks applied in a loop, as a transformer encoder applies its layers."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([CallBlock(width) for _ in range(4)])
        self.a, self.b = nn.Linear(width, 2), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = (x > -100).float()
        h = x
        for block in self.blocks:
            h = block(h, mask)[0]
        return {"a": self.a(h), "b": self.b(h)}


class LambdaBlock(nn.Module):
    """A block holding a function made at run time (no source form): model.py cannot build it
    whole, so it writes the block's own calls and ops instead of calling the factory."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = lambda x: x.relu() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class NeckNet(nn.Module):
    """A block the surgery leaves untouched, a neck to branch, and two heads."""

    def __init__(self, block: nn.Module, width: int = 8):
        super().__init__()
        self.block, self.neck = block, nn.Linear(width, width)
        self.a, self.b = nn.Linear(width, 2), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.neck(self.block(x))
        return {"a": self.a(h), "b": self.b(h)}


def LambdaNet() -> NeckNet:  # noqa: N802 - named like the models it stands beside
    return NeckNet(LambdaBlock())


class ConstBlock(nn.Module):
    """Makes a tensor from constants in its forward, which tracing lifts into a constant of the
    graph module (``_tensor_constant0``), as Swin's relative position index."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.linspace(0.0, 1.0, self.fc.out_features)


def ConstNet() -> NeckNet:  # noqa: N802
    return NeckNet(ConstBlock())


def NamedSequentialNet() -> NeckNet:  # noqa: N802
    """An untouched ``nn.Sequential`` whose children have names, not indices (timm's LeViT):
    rebuilt as ``nn.Sequential(a, b)`` it would name them 0 and 1."""
    return NeckNet(nn.Sequential(collections.OrderedDict(act=nn.Hardswish(),
                                                         fc=nn.Linear(8, 8))))


class TokenEncoder(nn.Module):
    """A single-task token encoder taking token ids only (no attention mask): a padding mask
    declared in the spec goes to the heads, not to it. Position-wise, so padding cannot change
    the real tokens' features."""

    def __init__(self, vocab: int = 50, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mix(self.embed(input_ids))))


class SharedCallTwice(nn.Module):
    """Weight tying (a): one module called at two places."""

    def __init__(self, dim: int = 16, tasks: Sequence[str] = ("left", "right")):
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


class SingleTaskCNN(nn.Module):
    """A plain single-task classifier returning one tensor (a backbone to convert)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                   nn.BatchNorm2d(2 * width), nn.ReLU())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(self.stem(image)).mean((2, 3)))


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss given to a spec as ``tests.models:squared_error``: cross-entropy's class scores
    against a one-hot target."""
    one_hot = torch.nn.functional.one_hot(target, output.shape[-1]).to(output.dtype)
    return ((output - one_hot) ** 2).mean()


def wrong_items(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A metric given as ``tests.models:wrong_items``: 1 per misclassified item (lower is
    better)."""
    return (output.argmax(-1) != target).float()


def no_signal(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A metric that never changes (0 per item): validation never improves."""
    return torch.zeros(len(target))


class NoisyProjection(nn.Module):
    """A layer applying functional dropout with its probability kept as a plain attribute
    (as Longformer's self-attention does): no torch.nn Dropout module to set to p=0."""

    def __init__(self, width: int, p: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.dropout = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x @ self.weight, self.dropout, self.training)


class NoisyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.trunk = nn.Linear(width, width)
        self.noisy = NoisyProjection(width)
        self.a = nn.Linear(width, 2)
        self.b = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.noisy(self.trunk(x).relu())
        return {"a": self.a(h), "b": self.b(h)}


class PretrainedTwoHeads(nn.Module):
    """A user's own multi-task wrapper around the pretrained MiniLM: the encoder as an attribute,
    a token head and a sentence head of its own, outputs by task name."""

    def __init__(self) -> None:
        super().__init__()
        from reconfx.zoo import minilm

        self.encoder = minilm()
        self.ner = nn.Linear(384, 9)
        self.sentiment = nn.Sequential(nn.Linear(384, 64), nn.Tanh(), nn.Linear(64, 2))

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        return {"ner": self.ner(hidden), "sentiment": self.sentiment(hidden.mean(1))}


class Symmetric(nn.Module):
    """A parametrization of a user's own: the weight is kept symmetric."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.triu() + w.triu(1).transpose(0, 1)


class WeightNormed(nn.Module):
    """An audio-style encoder with parametrized layers, as Wav2Vec2's positional convolution
    (``weight_norm`` over the kernel axis) and a user's own parametrization: torch gives each
    such module a class of its own (``ParametrizedConv1d``), which nothing can import."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils import parametrize
        from torch.nn.utils.parametrizations import weight_norm

        self.conv = nn.Conv1d(1, 8, 5, stride=2)
        self.pos = weight_norm(nn.Conv1d(8, 8, 4, padding=2, groups=2), name="weight", dim=2)
        self.mix = parametrize.register_parametrization(nn.Linear(8, 8), "weight", Symmetric())
        self.norm = nn.LayerNorm(8)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.conv(wave.unsqueeze(1))
        h = h + self.pos(h)[..., :-1]
        h = self.norm(self.mix(h.transpose(1, 2))).mean(1)
        return {"a": self.a(h), "b": self.b(h)}


class Gate(nn.Module):
    """Two layers behind Python control flow on a tensor's value: fx cannot trace it, and
    torch.export cannot either, so tracing keeps it as one leaf."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.up(x)
        if h.sum() > 0:
            h = h.relu()
        return self.down(h)


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)

    def forward(self, x):
        h = self.gate(self.fc(x))
        return {"a": self.a(h), "b": self.b(h)}


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class BlockList(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class WrappedBlocks(nn.Module):
    """Residual blocks in a ModuleList, inside an ``nn.Sequential`` item (``trunk.1``), as a
    user's wrapper nests a backbone: two levels of blocks hold a branch point in the last
    block."""

    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, width), BlockList(width, depth))
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Linear(width, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


class GatedPair(nn.Module):
    """Two layers behind Python control flow on a tensor's value: fx keeps the block as one
    coarse leaf, and torch.export cannot trace it at all."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.down(h)


class GatedNet(nn.Module):
    """A stem, a :class:`GatedPair` and two heads."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.gated = GatedPair(width)
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Linear(width, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.gated(self.stem(x))
        return {task: head(h) for task, head in self.heads.items()}


class Towers(nn.Module):
    """A stem, then parallel towers of different widths summed: branching a layer in one tower
    costs that tower's FLOPs (and the small tail), not the others'."""

    def __init__(self, widths: Sequence[int] = (6, 4, 4), width: int = 16):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(width, width * k), nn.ReLU(),
                                                  nn.Linear(width * k, width)) for k in widths)
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Linear(width, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.stem(x)
        h = sum(tower(h) for tower in self.towers)
        return {task: head(h) for task, head in self.heads.items()}


class DropoutBlock(nn.Module):
    """A residual block with two dropouts: a module and a functional one (as attention
    dropout is written), each drawing a mask in train mode."""

    def __init__(self, width: int, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(p)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(torch.relu(self.fc(self.norm(x))), self.p, self.training)
        return x + self.drop(h)


class BlockStack(nn.Module):
    """A linear embedding, ``depth`` blocks made by ``block(width)`` one after another, and
    heads ``a`` and ``b``."""

    def __init__(self, block: Callable[[int], nn.Module], width: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Linear(width, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return {task: head(h) for task, head in self.heads.items()}


class DropoutStack(BlockStack):
    """Blocks drawing dropout masks one after another: branched at the first block, each
    task stream meets several dropouts after the branch point."""

    def __init__(self, width: int = 8, depth: int = 3, p: float = 0.25):
        super().__init__(lambda w: DropoutBlock(w, p), width, depth)


class RMSNorm(nn.Module):
    """A norm of the user's own (as Llama's and T5's): traced through, its weight read directly
    by the graph; its input cast to float32 first, which for a float32 input passes it on."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class NormBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = RMSNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(torch.relu(self.norm(x)))


class NormBlocks(BlockStack):
    """Residual blocks opening with a norm whose weight the graph reads directly."""

    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__(NormBlock, width, depth)


class TokenEmbeddings(nn.Module):
    """Token and position embeddings, as BERT's: the position table is looked up with a table
    of ids that has no batch axis (one row, broadcast over the batch)."""

    def __init__(self, vocab: int, width: int, length: int):
        super().__init__()
        self.vocab, self.width, self.length = vocab, width, length
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("ids", torch.arange(length).unsqueeze(0), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.positions(self.ids[:, :tokens.shape[1]])
        return self.norm(self.tokens(tokens) + positions)


class PositionEncoder(nn.Module):
    """Embeddings, then residual blocks, then heads on the mean over tokens."""

    def __init__(self, vocab: int = 20, width: int = 8, length: int = 16):
        super().__init__()
        self.embed = TokenEmbeddings(vocab, width, length)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(2))
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 2), "b": nn.Linear(width, 3)})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return {task: head(h.mean(1)) for task, head in self.heads.items()}


class FedEncoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(inputs_embeds))


class EncoderFedByModel(nn.Module):
    """An encoder–decoder whose encoder takes what the model computes from its own inputs, as
    a time-series transformer hands its scaled, lagged values on as ``inputs_embeds``."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.scale = nn.Linear(3, width)
        self.encoder = FedEncoder(width)
        self.decoder = nn.Linear(width, width)

    def get_encoder(self) -> nn.Module:
        return self.encoder

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def forward(self, past_values: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(inputs_embeds=self.scale(past_values))
        return {"encoder_last_hidden_state": hidden, "last_hidden_state": self.decoder(hidden)}
