"""Stream batching: compiled models with and without it, side by side in one run.

Each model is traced, one early layer branched (so that most of the network is shared but runs
once per task stream), then compiled twice from the same branched graph: unbatched
(``branch.stream_batching: off``) and batched (the default, ``eval``). Both are checked to give
the same outputs (atol 1e-4), then their eager forward in eval mode (``torch.no_grad``) is timed,
called alternately, median of ``--repeats`` after one warm-up. Speed-up = unbatched / batched.

* stack: the issue's reference stack (4 ``nn.TransformerEncoder`` layers, d=64, 4 heads,
  feed-forward 128, 16 tokens) behind a linear stem, branched at the stem: the whole stack runs
  once per task stream;
* transformer: ``nn.TransformerEncoder`` (d=64, 4 heads, 4 layers, feed-forward 128, 16
  tokens; ``reconfx.zoo.EncoderClassifier``), branched at ``encoder.layers.0.linear1``;
* BERT-small (HF ``BertModel``: 4 layers, hidden 512, 8 heads, 16 tokens), branched at the
  query projection of layer 2 (layers 2-3 then run once per stream);
* ResNet (the MultiDigits ``SmallResNet``, width 32, 12×12 input), branched at
  ``layer2.0.conv1`` with per-task BatchNorm statistics (the default): the shared convolutions
  after it are the regions.

With ``--tuned`` a third copy is compiled with ``stream_batching: tuned`` (each region's streams
per call measured at ``--batches``, :mod:`reconfx.tuning`) and timed beside the other two.

With ``--upper-bound`` the issue's own measurement is repeated beside compiled models: the
reference stack (4 ``nn.TransformerEncoder`` layers, d=64) in eager eval mode, T calls against
one call on the streams concatenated, with PyTorch's fused fast path and with its Python path;
the compiled ``stack`` model's region (the whole stack) alone, its body called once per stream
against once on the streams concatenated; and the whole ``stack`` model (the stack behind a
branched linear stem), compiled unbatched and batched.

With ``--plain-calls`` the unbatched models (T = 4) run fx's own generated code, every aten op
called through its ``OpOverload``, against reconfx's (:mod:`reconfx.aten`: the same ops called
as Tensor methods, operators and torch functions).

With ``--per-op`` each model's regions are taken apart: every op of a region's body, on the
arguments it gets in the model, timed as T calls on one stream's arguments against one call on
the streams' arguments joined, each op in a tight loop of 10 calls, the two alternately, median of
``--repeats``; summed over the ops that compute (anything that reads every element: matrix
products, attention, norms, activations, additions, copies) and over the views and no-ops
(reshapes, transposes, selects, eval-mode Dropout), beside the regions' own calls. It shows which
part of the forward joining streams shrinks.

With ``--torch-compile`` a second table gives, at T = 4 and batch 16, ``torch.compile``
(inductor) of the batched model against its eager forward. With ``--train-step`` a third table
shows why training is not batched: a per-task gradient step (forward, then one backward pass per
task loss) through the same ``nn.TransformerEncoder`` stack, T separate streams against one
concatenated batch split afterwards.

Run: ``.venv/bin/python bench/stream_batching.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from handwritten import forward, side_by_side  # noqa: E402

from reconfx.aten import plain_calls
from reconfx.batching import batch_streams
from reconfx.heads import HeadSpec, attach_heads
from reconfx.layers import inventory, match_layers
from reconfx.rewrite import branch
from reconfx.streams import regions_of, run_streams, streams_per_call
from reconfx.timing import alternating_medians
from reconfx.tracing import trace
from reconfx.tuning import captured_inputs, tune
from reconfx.zoo import EncoderClassifier, SmallResNet, hf_model

SEQ = 16


class Tasks(nn.Module):
    """A single-output model with one linear head per task on its mean-pooled feature."""

    def __init__(self, body: nn.Module, width: int, tasks: list[str]):
        super().__init__()
        self.body = body
        self.heads = nn.ModuleDict({t: nn.Linear(width, 3) for t in tasks})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body.encoder(self.body.embed(tokens))
        return {t: head(h.mean(1)) for t, head in self.heads.items()}


def encoder_stack() -> nn.TransformerEncoder:
    """The issue's reference stack: 4 ``nn.TransformerEncoder`` layers, d=64, 4 heads."""
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


class StackTasks(nn.Module):
    """The reference stack behind a linear stem; branching the stem runs the whole stack once
    per task stream."""

    def __init__(self, tasks: list[str]):
        super().__init__()
        self.stem = nn.Linear(64, 64)
        self.encoder = encoder_stack()
        self.heads = nn.ModuleDict({t: nn.Linear(64, 3) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(self.stem(x))
        return {t: head(h.mean(1)) for t, head in self.heads.items()}


def stack(tasks: list[str]):
    return (StackTasks(tasks).eval(), lambda b: {"x": torch.randn(b, SEQ, 64)}, "export",
            {"x": [0]}, ["stem"])


def transformer(tasks: list[str]):
    body = EncoderClassifier(vocab=100, dim=64, heads=4, layers=4)
    model = Tasks(body, 64, tasks).eval()
    return (model, lambda b: {"tokens": torch.randint(0, 100, (b, SEQ))}, "export",
            {"tokens": [0]}, ["body.encoder.layers.0.linear1"])


def bert_small(tasks: list[str]):
    backbone = hf_model("BertModel", dict(hidden_size=512, num_hidden_layers=4,
                                          num_attention_heads=8, intermediate_size=2048))
    example = {"input_ids": torch.randint(0, 30522, (2, SEQ))}
    heads = {t: HeadSpec(out_features=10, pool="mean") for t in tasks}
    model = attach_heads(backbone, "last_hidden_state", heads=heads, example=example,
                         where="bench").eval()
    return (model, lambda b: {"input_ids": torch.randint(0, 30522, (b, SEQ))}, "export",
            {"input_ids": [0, 1]}, ["backbone.encoder.layer.2.attention.self.query"])


def resnet(tasks: list[str]):
    model = SmallResNet(num_classes=10, tasks=tasks, width=32).eval()
    return (model, lambda b: {"image": torch.randn(b, 1, 12, 12)}, "fx", {"image": [0]},
            ["layer2.0.conv1"])


MODELS = {"stack": ("stack (stem + 4 encoder layers)", stack),
          "transformer": ("transformer (d64, 4 layers)", transformer),
          "bert": ("BERT-small", bert_small), "resnet": ("ResNet (MultiDigits, w32)", resnet)}


def pair(build: Callable, tasks: list[str]) -> tuple[nn.Module, nn.Module, Callable]:
    torch.manual_seed(0)
    model, make, tier, dynamic, patterns = build(tasks)
    example = make(4)
    traced = trace(model, example, task_paths={t: t for t in tasks}, dynamic=dynamic, tier=tier)
    layers = [x for x in inventory(traced.module, tasks) if x.shared]
    chosen, _ = match_layers(layers, patterns)
    unbatched = branch(traced.module, chosen, tasks).module
    batched = batch_streams(unbatched, example, list(dynamic))
    assert regions_of(batched), "no region to batch"
    return unbatched.eval(), batched.eval(), make


def gradient_step(tasks: int, batch: int, joined: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    encoder = encoder_stack().train()
    params = list(encoder.parameters())
    streams = [torch.randn(batch, SEQ, 64) for _ in range(tasks)]

    def run() -> None:
        outs = (encoder(torch.cat(streams)).chunk(tasks) if joined
                else [encoder(x) for x in streams])
        losses = [o.square().mean() for o in outs]
        for i, loss in enumerate(losses):
            torch.autograd.grad(loss, params, retain_graph=i < tasks - 1)
    return run


def eager_streams(encoder: nn.Module, streams: list[torch.Tensor], joined: bool, fastpath: bool
                  ) -> Callable[[], None]:
    """The issue's upper-bound measurement: the stack in eager eval mode, one call per stream or
    one call on the streams concatenated, with PyTorch's fused fast path on or off."""
    def run() -> None:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.no_grad():
            _ = encoder(torch.cat(streams)).chunk(len(streams)) if joined else [
                encoder(x) for x in streams]
        torch.backends.mha.set_fastpath_enabled(True)
    return run


def region_calls(model: nn.Module, inputs: dict, joined: bool) -> Callable[[], None]:
    """The compiled model's regions alone, one after the other, each on the inputs it gets
    from ``inputs``: its body called once per stream, or once on the streams concatenated."""
    regions = regions_of(model)
    captured = captured_inputs(model, regions, inputs)
    caps = [r.max_rows for r in regions]

    def run() -> None:
        with torch.no_grad():
            for region, rows in zip(regions, caps, strict=True):
                region.max_rows = None if joined else 0  # all streams in one call, or one each
                region(*captured[region])
                region.max_rows = rows
    return run


def upper_bound(tasks: int, batches: list[int], repeats: int) -> None:
    names = [f"t{i}" for i in range(tasks)]
    unbatched, batched, make = pair(stack, names)
    encoder = encoder_stack().eval()
    print(f"\n| batch | eager stack, fast path: {tasks} calls / 1 joined | eager stack, Python "
          f"path: {tasks} calls / 1 joined | compiled region alone: {tasks} calls / 1 joined | "
          "compiled stack model: unbatched / batched |\n|---|---|---|---|---|")
    for batch in batches:
        inputs = make(batch)
        streams = [torch.randn(batch, SEQ, 64) for _ in names]
        t = side_by_side(*(eager_streams(encoder, streams, joined, fast)
                           for fast in (True, False) for joined in (False, True)),
                         *(region_calls(batched, inputs, joined) for joined in (False, True)),
                         forward(unbatched, inputs), forward(batched, inputs), repeats=repeats)
        cells = [f"{1e3 * a:.2f} / {1e3 * b:.2f} ({a / b:.2f}x)"
                 for a, b in zip(t[::2], t[1::2], strict=True)]
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


# Ops that read no element (or, like eval-mode Dropout, return their input): the rest compute.
VIEWS = frozenset("""view _unsafe_view reshape transpose t permute select squeeze unsqueeze
unflatten flatten expand expand_as getitem size sym_size narrow slice alias detach chunk split
unbind Dropout Identity""".split())


class _Ops(fx.Interpreter):
    """Runs a region body, keeping each op's node and the arguments it got."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self.calls: list[tuple[fx.Node, tuple, dict]] = []

    def run_node(self, n: fx.Node):
        if n.op in ("call_function", "call_method", "call_module"):
            self.calls.append((n, *self.fetch_args_kwargs_from_env(n)))
        return super().run_node(n)


Op = tuple[str, Callable, tuple, dict]  # name, callable, args, kwargs


def region_ops(model: nn.Module, inputs: dict, joined: bool) -> list[list[Op]]:
    """The ops of the model's regions as they run on ``inputs``, per body call (region by
    region: one call per stream, or one call on the streams joined), spelled as compiled code
    runs them (:func:`reconfx.aten.plain_calls`)."""
    regions = regions_of(model)
    captured = captured_inputs(model, regions, inputs)
    calls: list[list[Op]] = []
    for region in regions:
        def body(*values, region=region):
            ops = _Ops(model, region.body)
            out = ops.run(*values)
            calls.append([_op(model, n) + (a, k) for n, a, k in ops.calls])
            return out
        with plain_calls(region.body), torch.no_grad():
            run_streams(body, *region.stream_args(captured[region]), None if joined else 0)
    return calls


def _op(model: nn.Module, node: fx.Node) -> tuple[str, Callable]:
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return type(module).__name__, module
    if node.op == "call_method":
        return str(node.target), getattr(torch.Tensor, str(node.target))
    return getattr(node.target, "__name__", str(node.target)), node.target


def per_op(models: list[str], tasks: int, batches: list[int], repeats: int) -> None:
    print(f"\n| model | T | batch | compute ops us: {tasks} calls / joined | views and no-ops us "
          f"| largest compute ops | region calls ms |\n|---|---|---|---|---|---|---|")
    for key in models:
        name, build = MODELS[key]
        _, batched, make = pair(build, [f"t{i}" for i in range(tasks)])
        for batch in batches:
            inputs = make(batch)
            separate = region_ops(batched, inputs, False)
            joined = region_ops(batched, inputs, True)
            sums: dict[str, list[float]] = {}
            for r, ops in enumerate(joined):
                streams = separate[r * tasks:(r + 1) * tasks]
                for i, (op, fn, args, kwargs) in enumerate(ops):
                    each = [s[i][1:] for s in streams]
                    times = alternating_medians(
                        [_loop(each * 10), _loop([(fn, args, kwargs)] * 10)], repeats)
                    for part in (op, "views" if op in VIEWS else "compute"):
                        acc = sums.setdefault(part, [0.0, 0.0])
                        acc[0] += times[0] / 10
                        acc[1] += times[1] / 10
            top = sorted((k for k in sums if k not in VIEWS | {"views", "compute"}),
                         key=lambda k: -sums[k][0])[:3]
            region = alternating_medians([region_calls(batched, inputs, j) for j in (False, True)],
                                         repeats)
            cells = [_ratio(*sums["compute"], 1e6, 0),
                     _ratio(*sums["views"], 1e6, 0) if "views" in sums else "none",
                     ", ".join(f"{k} {sums[k][0] / sums[k][1]:.2f}x" for k in top),
                     _ratio(*region, 1e3, 2)]
            print(f"| {name} | {tasks} | {batch} | " + " | ".join(cells) + " |", flush=True)


def _loop(calls: list[tuple[Callable, tuple, dict]]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            for fn, args, kwargs in calls:
                fn(*args, **kwargs)
    return run


def _ratio(a: float, b: float, scale: float, digits: int) -> str:
    return f"{scale * a:.{digits}f} / {scale * b:.{digits}f} ({a / b:.2f}x)"


def calls_column(model: nn.Module, batch: int, tasks: int) -> str:
    counts = {streams_per_call(tasks, batch, r.max_rows) for r in regions_of(model)}
    return "/".join(str(c) for c in sorted(counts))


def versus(what: str, models: list[str], batches: list[int], repeats: int,
           pick: Callable[[nn.Module, nn.Module], tuple[nn.Module, nn.Module]]) -> None:
    """A table of two variants of each model at T = 4, side by side: ``pick`` gets the
    unbatched and batched compiled models and returns the two to time."""
    print(f"\n| model | T | batch | forward ms {what} | speed-up |\n|---|---|---|---|---|")
    for key in models:
        name, build = MODELS[key]
        unbatched, batched, make = pair(build, [f"t{i}" for i in range(4)])
        first, second = pick(unbatched, batched)
        for batch in batches:
            inputs = make(batch)
            a, b = side_by_side(forward(first, inputs), forward(second, inputs), repeats=repeats)
            print(f"| {name} | 4 | {batch} | {1e3 * a:.2f} / {1e3 * b:.2f} | {a / b:.2f}x |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the main table only)")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--train-step", action="store_true")
    parser.add_argument("--tuned", action="store_true",
                        help="also a copy with stream_batching: tuned (tuned at --batches)")
    parser.add_argument("--plain-calls", action="store_true",
                        help="the unbatched models' generated code, aten overload calls (fx's "
                             "own codegen) vs plain spellings (reconfx.aten), at T = 4")
    parser.add_argument("--per-op", action="store_true",
                        help="each region op timed as T calls vs one joined call (at each "
                             "--tasks)")
    parser.add_argument("--upper-bound", action="store_true",
                        help="the eager stack, T calls vs one joined call, beside the compiled "
                             "stack model (at each --tasks)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
          f"median of {args.repeats}")
    tuned_head = (" rule / tuned", " / tuned", " | tuned speed-up", "---|") if args.tuned else (
        "", "", "", "")
    print("\n| model | T | batch | streams per call{} | forward ms unbatched / batched{} | "
          "speed-up{} |\n|---|---|---|---|---|---|{}".format(*tuned_head))
    for key in args.models:
        name, build = MODELS[key]
        for t in args.tasks:
            tasks = [f"t{i}" for i in range(t)]
            unbatched, batched, make = pair(build, tasks)
            unbatched, batched = unbatched.to(args.device), batched.to(args.device)
            models = [unbatched, batched]
            if args.tuned:
                models.append(copy.deepcopy(batched))
                tune(models[-1], {b: {k: v.to(args.device) for k, v in make(b).items()}
                                  for b in args.batches}, args.repeats)
            for batch in args.batches:
                inputs = {k: v.to(args.device) for k, v in make(batch).items()}
                with torch.no_grad():
                    want = unbatched(**inputs)
                    for model in models[1:]:
                        got = model(**inputs)
                        for task in tasks:
                            torch.testing.assert_close(got[task], want[task], rtol=1e-4,
                                                       atol=1e-4)
                times = side_by_side(*(forward(m, inputs) for m in models), repeats=args.repeats)
                calls = " / ".join(calls_column(m, batch, t) for m in models[1:])
                ms = " / ".join(f"{1e3 * x:.2f}" for x in times)
                ratios = " | ".join(f"{times[0] / x:.2f}x" for x in times[1:])
                print(f"| {name} | {t} | {batch} | {calls} | {ms} | {ratios} |", flush=True)
    if args.plain_calls:
        # fx's own code generation for the unbatched graph: every aten op via its OpOverload.
        versus("aten overload calls / plain calls", args.models, args.batches, args.repeats,
               lambda unbatched, _: (torch.fx.GraphModule(unbatched, unbatched.graph).eval(),
                                     unbatched))
    if args.per_op:
        for t in args.tasks:
            per_op(args.models, t, args.batches, args.repeats)
    if args.upper_bound:
        for t in args.tasks:
            upper_bound(t, args.batches, args.repeats)
    if args.train_step:
        print("\n| T | batch | per-task gradient step ms separate / concatenated | ratio |"
              "\n|---|---|---|---|")
        for t in args.tasks:
            for batch in args.batches[:2]:
                a, b = side_by_side(*(gradient_step(t, batch, joined) for joined in (False, True)),
                                    repeats=args.repeats)
                print(f"| {t} | {batch} | {1e3 * a:.1f} / {1e3 * b:.1f} | {a / b:.2f}x |",
                      flush=True)
    if args.torch_compile:
        versus("eager batched / torch.compile", args.models, [16], args.repeats,
               lambda _, batched: (batched, torch.compile(batched)))

if __name__ == "__main__":
    main()
