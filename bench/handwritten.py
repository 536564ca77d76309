"""reconfx's compiled models against hand-written branched models, side by side in one run.

The hand-written models are built the way the official Recon code branches an architecture: the
shared trunk as ordinary modules, the branched part as one ``nn.ModuleList`` entry per task (deep
copies of the original modules, so the weights are the same), the task streams as a Python list.
Compiled models come from reconfx's passes (trace, select the same layers, branch) on the same
original model. Each pair is checked to give the same outputs before it is timed.

* ResNet: the MultiDigits ``SmallResNet`` (width 32), stages 3-4 branched (every layer in them)
  plus the heads; input 1×12×12.
* BERT-small (HF ``BertModel``, 4 layers, hidden 512, 8 heads, random weights, 32 tokens): the
  last two encoder layers branched, mean-pooled linear heads.

For T = 2, 4, 8 tasks and batch 1, 16, 128: eager forward in eval mode (``torch.no_grad``) and a
training step in train mode (forward + one backward pass per task loss, as per-task gradient
methods need), compiled vs hand-written called alternately, median of ``--repeats`` after one
warm-up. Ratio = compiled / hand-written (target ≤ 1.05). With ``--torch-compile`` the table
also gives ``torch.compile`` (inductor) of the compiled model against its eager forward.

Run: ``.venv/bin/python bench/handwritten.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reconfx.heads import HeadSpec, attach_heads  # noqa: E402
from reconfx.layers import inventory, match_layers  # noqa: E402
from reconfx.rewrite import branch  # noqa: E402
from reconfx.timing import alternating_medians  # noqa: E402
from reconfx.tracing import trace  # noqa: E402
from reconfx.zoo import SmallResNet, hf_model  # noqa: E402

SEQ = 32


class HandResNet(nn.Module):
    """SmallResNet with stages ``split`` and later copied per task, Recon style."""

    def __init__(self, base: SmallResNet, tasks: list[str], split: int = 3):
        super().__init__()
        stages = [base.layer1, base.layer2, base.layer3, base.layer4]
        self.tasks = tasks
        self.stem = nn.Sequential(base.conv1, base.bn1, base.relu)
        self.shared = nn.Sequential(*stages[:split - 1])
        self.branches = nn.ModuleList(
            nn.Sequential(*copy.deepcopy(stages[split - 1:])) for _ in tasks)
        self.pool = base.avgpool
        self.heads = nn.ModuleList(copy.deepcopy(base.heads[t]) for t in tasks)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(self.stem(image))
        streams = [branch(x) for branch in self.branches]
        return {t: head(torch.flatten(self.pool(s), 1))
                for t, s, head in zip(self.tasks, streams, self.heads, strict=True)}


class HandBert(nn.Module):
    """BERT with encoder layers ``split`` and later copied per task, Recon style."""

    def __init__(self, base: nn.Module, tasks: list[str], split: int):
        super().__init__()
        bert = base.backbone
        self.tasks = tasks
        self.embeddings = bert.embeddings
        self.shared = nn.ModuleList(bert.encoder.layer[:split])
        self.branches = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(bert.encoder.layer[split:])) for _ in tasks)
        self.heads = nn.ModuleList(copy.deepcopy(base.heads[t]) for t in tasks)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self._run(self.shared, self.embeddings(input_ids=input_ids))
        streams = [self._run(layers, h) for layers in self.branches]
        return {t: head(s) for t, s, head in zip(self.tasks, streams, self.heads, strict=True)}


def resnet_pair(tasks: list[str]) -> tuple[nn.Module, nn.Module, Callable[[int], dict]]:
    torch.manual_seed(0)
    base = SmallResNet(num_classes=10, tasks=tasks, width=32).eval()
    compiled = compiled_from(base, {"image": torch.randn(4, 1, 12, 12)}, tasks,
                             ["layer3.*", "layer4.*"], "fx")
    return compiled, HandResNet(base, tasks), lambda b: {"image": torch.randn(b, 1, 12, 12)}


def bert_pair(tasks: list[str]) -> tuple[nn.Module, nn.Module, Callable[[int], dict]]:
    torch.manual_seed(0)
    backbone = hf_model("BertModel", dict(hidden_size=512, num_hidden_layers=4,
                                          num_attention_heads=8, intermediate_size=2048,
                                          hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0))
    example = {"input_ids": torch.randint(0, 30522, (2, SEQ))}
    heads = {t: HeadSpec(out_features=10, pool="mean") for t in tasks}
    base = attach_heads(backbone, "last_hidden_state", heads=heads, example=example,
                        where="bench").eval()
    compiled = compiled_from(base, example, tasks,
                             ["backbone.encoder.layer.2.*", "backbone.encoder.layer.3.*"],
                             "export", dynamic={"input_ids": [0, 1]})
    return compiled, HandBert(base, tasks, 2), \
        lambda b: {"input_ids": torch.randint(0, 30522, (b, SEQ))}


def compiled_from(base: nn.Module, example: dict, tasks: list[str], patterns: list[str],
                  tier: str, dynamic: dict | None = None) -> nn.Module:
    traced = trace(base, example, task_paths={t: t for t in tasks},
                   dynamic=dynamic or {"image": [0]}, tier=tier)
    layers = [x for x in inventory(traced.module, tasks) if x.shared]
    chosen, _ = match_layers(layers, patterns)
    return branch(traced.module, chosen, tasks).module


def check_same(a: nn.Module, b: nn.Module, inputs: dict) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        x, y = a(**inputs), b(**inputs)
    for task in y:
        torch.testing.assert_close(x[task], y[task], rtol=1e-4, atol=1e-5)


def forward(model: nn.Module, inputs: dict) -> Callable[[], None]:
    """One eval forward; on a GPU it waits for the kernels to finish."""
    cuda = any(v.is_cuda for v in inputs.values())

    def run() -> None:
        with torch.no_grad():
            model(**inputs)
        if cuda:
            torch.cuda.synchronize()
    return run


def train_step(model: nn.Module, inputs: dict, targets: dict) -> Callable[[], None]:
    def run() -> None:
        out = model(**inputs)
        losses = [F.cross_entropy(out[t], y) for t, y in targets.items()]
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < len(losses) - 1)
        model.zero_grad(set_to_none=True)
    return run


def side_by_side(*fns: Callable[[], None], repeats: int) -> tuple[float, ...]:
    """Median seconds of each function, called alternately ``repeats`` times after a warm-up."""
    return tuple(alternating_medians(fns, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--models", nargs="+", choices=["resnet", "bert"],
                        default=["resnet", "bert"])
    parser.add_argument("--torch-compile", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    header = ("| model | T | batch | forward ms compiled / hand | ratio | train step ms "
              "compiled / hand | ratio |")
    if args.torch_compile:
        header += " torch.compile forward ms | speed-up |"
    print("\n" + header)
    print("|---" * (header.count("|") - 1) + "|")
    pairs = {"resnet": ("ResNet (MultiDigits, w32)", resnet_pair),
             "bert": ("BERT-small", bert_pair)}
    for name, pair in (pairs[m] for m in args.models):
        for t in args.tasks:
            tasks = [f"t{i}" for i in range(t)]
            compiled, hand, make = pair(tasks)
            check_same(compiled, hand, make(3))
            for batch in args.batches:
                inputs = make(batch)
                targets = {task: torch.randint(0, 10, (batch,)) for task in tasks}
                compiled.eval(), hand.eval()
                fc, fh = side_by_side(forward(compiled, inputs), forward(hand, inputs),
                                      repeats=args.repeats)
                compiled.train(), hand.train()
                sc, sh = side_by_side(train_step(compiled, inputs, targets),
                                      train_step(hand, inputs, targets),
                                      repeats=args.repeats)
                row = (f"| {name} | {t} | {batch} | {1e3 * fc:.2f} / {1e3 * fh:.2f} | "
                       f"{fc / fh:.3f} | {1e3 * sc:.1f} / {1e3 * sh:.1f} | {sc / sh:.3f} |")
                if args.torch_compile:
                    compiled.eval()
                    fast = torch.compile(compiled)
                    fz, fe = side_by_side(forward(fast, inputs), forward(compiled, inputs),
                                          repeats=args.repeats)
                    row += f" {1e3 * fz:.2f} | {fe / fz:.2f}x |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
