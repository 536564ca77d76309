"""Stream batching (README, "Stream batching"): task streams run through shared layers as one
batch where that is exact, with I1-I6 kept (I1 within atol 1e-5), and off on request."""

import time

import torch
from torch import nn

import reconfx
from reconfx.aten import spelling
from reconfx.build import example_inputs
from reconfx.commands import compile_spec
from reconfx.emit.onnx import onnx_session
from reconfx.graph import region_call
from reconfx.kinds import exact_module
from reconfx.streams import BUDGET_BYTES, one_call_per_region, regions_of, run_streams
from reconfx.timing import alternating_medians
from reconfx.tree import task_outputs
from reconfx.tuning import Tuned, best_rows, per_call_options
from tests.support import compile_and_verify, write_spec


def test_run_streams_joins_all_streams_or_runs_them_one_by_one():
    streams = [(torch.randn(8, 3),) for _ in range(4)]
    bias = torch.randn(8, 3)  # shared, with a batch axis: repeated per stream in a call
    calls = []

    def body(x, b, size, scale):
        calls.append((x.shape[0], size))
        return x * scale + b, x.sum(1)

    want = [body(s[0], bias, 8, 2.0) for s in streams]
    # Joined where all four streams (32 rows) fit under the cap; else each on its own.
    for max_rows, shapes in [(None, [(32, 32)]), (32, [(32, 32)]), (31, [(8, 8)] * 4),
                             (4, [(8, 8)] * 4), (0, [(8, 8)] * 4)]:
        calls.clear()
        got = run_streams(body, streams, (bias, 8), (2.0,), max_rows)
        assert calls == shapes, max_rows
        # Output by output, stream by stream.
        assert len(got) == 2 * len(streams)
        for i, (first, second) in enumerate(want):
            assert torch.equal(got[i], first)
            assert torch.equal(got[len(streams) + i], second)


def test_exactness_rule_per_module_kind_and_mode():
    for module in (nn.Linear(4, 4), nn.Conv2d(2, 2, 3), nn.LayerNorm(4), nn.GELU(),
                   nn.Embedding(5, 4), nn.AdaptiveAvgPool2d(1)):
        assert exact_module(module, training=False) and exact_module(module, training=True)
    assert exact_module(nn.BatchNorm2d(4), training=False)
    assert not exact_module(nn.BatchNorm2d(4), training=True)  # batch statistics
    assert not exact_module(nn.BatchNorm2d(4, track_running_stats=False), training=False)
    assert exact_module(nn.Dropout(0.1), training=False)
    assert not exact_module(nn.Dropout(0.1), training=True)  # its random draws
    assert exact_module(nn.MultiheadAttention(4, 2, batch_first=True), training=False)
    assert not exact_module(nn.MultiheadAttention(4, 2), training=False)  # batch in axis 1

    class Custom(nn.Linear):  # unknown forward: never batched
        pass

    assert not exact_module(Custom(4, 4), training=False)


def encoder_spec(tmp_path, batching, onnx=True, **branch):
    return write_spec(
        tmp_path, f"enc_{batching}",
        model={"factory": "reconfx.zoo:EncoderClassifier", "kwargs": {"layers": 3}},
        inputs=[{"name": "tokens", "shape": [4, 16], "dtype": "int64", "high": 30}],
        tasks=[{"name": "tok", "output": "0"}, {"name": "seq", "output": "1"}],
        select={"layers": ["encoder.layers.0.linear1"]},
        branch={"stream_batching": batching, **branch},
        export={"formats": ["python", "onnx"] if onnx else ["python"]})


def test_transformer_streams_run_as_one_batch_and_keep_the_invariants(tmp_path):
    out = tmp_path / "on"
    compiled = compile_and_verify(encoder_spec(tmp_path, "eval"), out)  # I1-I4, I6, ruff
    module = compiled.branched.module
    (region,) = regions_of(module)
    assert region.tasks == ("tok", "seq")
    # Everything after the branched linear1 of layer 0 up to the heads, attention included.
    assert {"encoder.layers.1.linear1", "encoder.layers.2.norm2"} <= set(region.modules_called)
    # Cost rule: the largest value per row is the attention's input projection, 16 tokens x
    # 3 x 32 features x 4 bytes; one call may hold BUDGET_BYTES of it.
    assert region.bytes_per_row == 16 * 3 * 32 * 4
    assert region.max_rows == BUDGET_BYTES // region.bytes_per_row
    # Only the eval graph is batched; training runs the streams one by one.
    assert not any(region_call(n) for n in module.train_graph.nodes)
    # The region body fetches its own parameters; the graph around it keeps none it never reads.
    assert not [n for n in module.eval_graph.nodes if n.op == "get_attr" and not n.users]
    assert compiled.checks[0].detail.startswith("atol 1e-05, eval and train mode")
    source = (out / "model.py").read_text()
    assert "def fits(" in source and "torch.cat(" in source
    assert ".unflatten(0, (2, -1)).unbind()" in source
    assert f'self.stream_rows = {{"{region.method}": {region.max_rows}}}' in source
    # One switch per region: training and an eval batch too large run the streams one by one.
    assert source.count("if self.training or not fits(") == 1
    assert "if not self.training" not in source and "else:\n" in source
    report = (out / "report.md").read_text()
    assert "exported by the dynamo exporter" in report  # I5 (dynamic batch) with batching on

    # Every grouping of the streams gives the original model's outputs (within atol 1e-5).
    original = compiled.prepared.model.eval()
    loaded = reconfx.load(out).eval()
    for batch, rows in [(1, None), (7, 14), (7, 7), (7, 1)]:
        example = example_inputs(compiled.prepared.loaded.spec.inputs, seed=5, batch=batch)
        want = task_outputs(original(**example), compiled.prepared.task_paths)
        loaded.stream_rows[region.method] = rows
        got = loaded(**example)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-5)

    # The ONNX file batches all streams in one call; onnxruntime agrees at another batch size.
    example = example_inputs(compiled.prepared.loaded.spec.inputs, seed=6, batch=9)
    ort = onnx_session(out / "model.onnx")(**{k: v.numpy() for k, v in example.items()})
    with one_call_per_region(loaded):
        eager = loaded(**example)
    for task, value in eager.items():
        torch.testing.assert_close(torch.from_numpy(ort[task]), value.detach(), rtol=1e-3,
                                   atol=1e-4)


def test_aten_glue_runs_in_plain_spellings_bit_exactly(tmp_path):
    """The tier-2 graph keeps its aten ops; the code that runs calls their Tensor methods and
    torch functions (faster to call), with bit-identical results in both modes."""
    compiled = reconfx.compile_spec(encoder_spec(tmp_path, "eval", onnx=False),
                                    tmp_path / "out", progress=False)
    module = compiled.branched.module
    (region,) = regions_of(module)
    for graph in (module.train_graph, module.eval_graph, region.body):
        aten = [n for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload)
                and n.target.namespace == "aten"]
        assert aten, "the graph itself keeps the aten ops"
        assert {spelling(n) for n in aten} != {None}
    example = example_inputs(compiled.prepared.loaded.spec.inputs, seed=3, batch=5)
    captured = []
    region.register_forward_pre_hook(lambda _, args: captured.append(args))
    for training in (True, False):
        module.train(training)
        assert ".transpose(" in module.code and "torch.ops.aten.transpose" not in module.code
        # The same graph generated by fx itself, with every call through its aten overload.
        reference = torch.fx.GraphModule(module, module.graph).train(training)
        assert "torch.ops.aten.transpose" in reference.code
        with torch.no_grad():
            torch.manual_seed(0)  # the same dropout draws in training mode
            got = module(**example)
            torch.manual_seed(0)
            want = reference(**example)
        for task in want:
            assert torch.equal(got[task], want[task]), (training, task)
    # The region body likewise, on one stream's inputs (the same region runs in both above).
    args, n_in = captured[-1], region.counts[0]
    one_stream = (*args[:n_in], *args[len(region.tasks) * n_in:])
    aten_body = torch.fx.GraphModule(module, region.body)
    assert "torch.ops.aten.transpose" in aten_body.code
    with torch.no_grad():
        for got, want in zip(region.run(*one_stream), aten_body(*one_stream), strict=True):
            assert torch.equal(got, want)


def test_batching_off_is_bit_exact_and_unbatched(tmp_path):
    out = tmp_path / "off"
    compiled = compile_and_verify(encoder_spec(tmp_path, "off", onnx=False), out)
    assert regions_of(compiled.branched.module) == []
    assert compiled.checks[0].detail.startswith("bit-exact")
    assert "fits(" not in (out / "model.py").read_text()


def test_batch_mixing_glue_stays_per_stream(tmp_path):
    spec = write_spec(tmp_path, "mixing",
                      model={"factory": "tests.models:BatchMixing", "kwargs": {}},
                      inputs=[{"name": "x", "shape": [6, 16]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc1"]})
    compiled = compile_and_verify(spec, tmp_path / "out")
    regions = regions_of(compiled.branched.module)
    batched = {m for r in regions for m in r.modules_called}
    # fc2 and norm run batched; the softmax over the batch axis (and what consumes it) not.
    assert {"fc2", "norm"} <= batched
    body_ops = {str(n.target) for r in regions for n in r.body.nodes if n.op != "placeholder"}
    assert not any("softmax" in op for op in body_ops)
    eval_ops = [n for n in compiled.branched.module.eval_graph.nodes
                if "softmax" in str(n.target)]
    assert len(eval_ops) == 2  # one per stream


def test_row_cap_grows_to_the_weights_a_region_reads(tmp_path):
    """Streams run one at a time each read the region's weights again: where those outweigh the
    intermediate budget, a call may hold as many bytes of intermediates as the weights."""
    spec = write_spec(tmp_path, "wide", model={"factory": "tests.models:WideShared"},
                      inputs=[{"name": "x", "shape": [4, 16]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["stem"]},
                      export={"formats": ["python"]})
    compiled = compile_spec(spec, tmp_path / "out")
    (region,) = [r for r in regions_of(compiled.branched.module) if "wide" in r.modules_called]
    wide = compiled.branched.module.get_submodule("wide")
    assert region.weight_bytes == 4 * (wide.weight.numel() + wide.bias.numel()) > BUDGET_BYTES
    assert region.bytes_per_row == 1024 * 4
    assert region.max_rows == region.weight_bytes // region.bytes_per_row == 1025
    assert compiled.checks[0].detail.startswith("atol 1e-05")


def test_three_streams_with_a_shared_attention_mask(tmp_path):
    """A BERT (export tier) whose attention mask is computed before the branch point: the mask
    is repeated once per stream in a batched call."""
    heads = [{"name": f"t{i}", "head": {"out_features": 2, "pool": "cls"}} for i in range(3)]
    spec = write_spec(
        tmp_path, "bert3",
        backbone={"factory": "reconfx.zoo:hf_model",
                  "kwargs": {"arch": "BertModel",
                             "config": {"vocab_size": 100, "hidden_size": 32,
                                        "num_hidden_layers": 3, "num_attention_heads": 4,
                                        "intermediate_size": 64}},
                  "feature": "last_hidden_state"},
        inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 100},
                {"name": "attention_mask", "shape": [2, 8], "dtype": "int64", "low": 0,
                 "high": 2}],
        tasks=heads, select={"layers": ["*layer.0.attention.self.query"]})
    compiled = compile_and_verify(spec, tmp_path / "out")
    (region, *_rest) = regions_of(compiled.branched.module)
    assert len(region.tasks) == 3
    assert any("layer.2.output.dense" in m for r in regions_of(compiled.branched.module)
               for m in r.modules_called)


def test_the_two_modes_differ_in_the_forward_only_where_a_region_runs(tmp_path, monkeypatch):
    """A block holding branched layers next to a shared ReLU that eval mode batches: the train
    graph keeps the same order as the eval graph (nothing is gained by reordering a stream that
    is not written as a class), so model.py's forward switches on the mode only around the
    regions (and the train-mode ops a region covers), never op by op the other way round. (The
    per-stream form, written where the task-rows form does not hold.)"""
    from reconfx import pipeline

    monkeypatch.setattr(pipeline, "task_rows", lambda *args, **kwargs: None)
    path = write_spec(tmp_path, "block", model={"factory": "reconfx.zoo:small_resnet",
                                                "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["bn1", "layer1.0.conv1", "layer1.0.bn1",
                                         "layer1.0.conv2", "layer1.0.bn2"]})
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    forward = source[source.index("    def forward("):]
    assert forward.count("if self.training or not fits(") >= 1
    assert forward.count("if self.training") == forward.count("if self.training or not fits(")
    assert "if not self.training:" not in forward  # (there were 9 before)


def test_a_region_failing_init_parity_turns_batching_off(tmp_path, monkeypatch):
    """Should a batched region not reproduce the model on the check's inputs, the compile keeps
    the unbatched model (bit-exact) and says so, rather than failing or shipping it."""
    from reconfx import streams

    real = streams.StreamRegion.run  # what the compiled module runs (the planner has its own)

    def skewed(self, *args):
        return tuple(out + 1e-3 for out in real(self, *args))

    monkeypatch.setattr(streams.StreamRegion, "run", skewed)
    compiled = compile_spec(encoder_spec(tmp_path, "eval", onnx=False), tmp_path / "out")
    assert regions_of(compiled.branched.module) == []
    assert compiled.checks[0].detail.startswith("bit-exact")
    (warning,) = [w for w in compiled.warnings if not w.startswith("branching at")]
    assert warning.startswith("stream batching turned off: with it, I1 init parity failed")
    assert "fits(" not in (tmp_path / "out" / "model.py").read_text()


def test_tuned_cap_is_the_measured_best():
    # Joining the four streams pays at batches 1 and 16 and loses at 128: any cap in [64, 511]
    # gives that; the smallest such candidate is kept. The rule's cap (16) runs the streams one
    # by one at batch 16.
    times = {1: {1: 3.0, 4: 1.0}, 16: {1: 5.0, 4: 3.0}, 128: {1: 10.0, 4: 15.0}}
    tuned = Tuned("shared_x", streams=4, rule_rows=16, times=times)
    assert per_call_options(4) == [1, 4] and per_call_options(1) == [1]
    tuned.rows = best_rows(tuned)
    assert tuned.rows == 64
    assert [tuned.choice(b) for b in times] == [4, 4, 1]
    assert [tuned.choice(b, tuned.rule_rows) for b in times] == [4, 1, 1]
    # Measurements that cannot tell the options apart keep the rule's cap.
    flat = Tuned("shared_x", 4, 16, times={b: dict.fromkeys([1, 4], 1.0) for b in times})
    assert best_rows(flat) == 16
    # Equal at batch 3, joining pays at batch 5: the smallest cap that joins 4 x 5 rows.
    odd = Tuned("shared_x", 4, 1, times={3: dict.fromkeys([1, 4], 1.0), 5: {1: 2.0, 4: 1.0}})
    assert best_rows(odd) == 20


def test_alternating_medians_interleave_and_leave_out_the_warm_up():
    # Tuning, report latencies and the benches time alternately: a slow first call (cold
    # caches) is the warm-up round and must not count.
    order = []

    def slow_once():
        if "a" not in order:
            time.sleep(0.2)
        order.append("a")
    medians = alternating_medians([slow_once, lambda: order.append("b")], repeats=3)
    assert order == ["a", "b"] * 4
    assert len(medians) == 2 and 0 <= medians[0] < 0.1 and 0 <= medians[1] < 0.1


def test_tuned_batching_measures_each_region_and_records_it(tmp_path):
    out = tmp_path / "tuned"
    spec = encoder_spec(tmp_path, "tuned", onnx=False, tune_batches=[1, 8], tune_repeats=2)
    compiled = compile_spec(spec, out)
    regions = regions_of(compiled.branched.module)
    assert [t.region for t in compiled.tuning] == [r.method for r in regions]
    report = (out / "report.md").read_text()
    source = (out / "model.py").read_text()
    for region, tuned in zip(regions, compiled.tuning, strict=True):
        assert set(tuned.times) == {1, 8}
        assert all(list(t) == per_call_options(len(region.tasks)) for t in tuned.times.values())
        assert region.max_rows == tuned.rows and tuned.rule_rows == BUDGET_BYTES // max(
            region.bytes_per_row, 1)

        def cost(rows, tuned=tuned):
            return sum(t[tuned.choice(b, rows)] / min(t.values()) for b, t in tuned.times.items())
        assert cost(tuned.rows) <= cost(tuned.rule_rows)  # never worse than the rule, measured
        assert f'"{region.method}": {tuned.rows}' in source
        for batch in (1, 8):
            assert f"| `{region.method}` | {batch} | 1: " in report
    assert "Caps measured on this machine (`stream_batching: tuned`)" in report
    assert compiled.checks[0].detail.startswith("atol 1e-05")
    # The emitted model with the tuned caps gives the original outputs at the tuned batches.
    original, loaded = compiled.prepared.model.eval(), reconfx.load(out).eval()
    for batch in (1, 8):
        example = example_inputs(compiled.prepared.loaded.spec.inputs, seed=3, batch=batch)
        want = task_outputs(original(**example), compiled.prepared.task_paths)
        got = loaded(**example)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-5)
