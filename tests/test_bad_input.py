"""Bad specs and models: one clear line each (file, field, what to do) and a non-zero exit."""

from pathlib import Path

import pytest
import torch

from reconfx.cli import main
from reconfx.zoo import small_resnet
from tests.support import write_spec

RESNET = {"factory": "reconfx.zoo:small_resnet", "kwargs": {"num_classes": 3, "width": 8}}
IMAGE = [{"name": "image", "shape": [2, 1, 12, 12]}]
TASKS = [{"name": "left"}, {"name": "right"}]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reconfx: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {factory: a:b\ninputs: [\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, str(path), "malformed YAML")


def test_unknown_key_names_the_line_and_the_allowed_fields(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=TASKS,
                      select={"layers": ["conv1"], "topk": 3})
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, f"{path}:", "select", "unknown field 'topk'", "top_k")


def test_wrong_type(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=[{"name": "image", "shape": "12x12"}],
                      tasks=TASKS)
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, "inputs[0].shape", "valid list")


def test_tuning_fields_without_tuned_batching(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=TASKS,
                      branch={"tune_batches": [1, 8]})
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, f"{path}", "branch", "tune_batches only apply with stream_batching: "
                    "tuned (it is 'eval')")


def test_missing_field(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, tasks=TASKS)
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, "inputs", "required field is missing")


def test_integer_inputs_need_an_upper_bound(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, tasks=TASKS,
                      inputs=[{"name": "ids", "shape": [2, 5], "dtype": "int64"}])
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, "inputs[0]", "need 'high'")


def test_factory_not_importable(tmp_path, capsys):
    path = write_spec(tmp_path, model={"factory": "nosuchpackage.models:net"}, inputs=IMAGE,
                      tasks=TASKS, select={"layers": ["x"]})
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(err, "model.factory", "cannot import 'nosuchpackage.models'")


def test_factory_raising(tmp_path, capsys):
    path = write_spec(tmp_path, model={"factory": "tests.models:raising_factory",
                                       "kwargs": {"width": 7}}, inputs=IMAGE, tasks=TASKS)
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "model.kwargs", "raised ValueError: width 7 is not supported")


def test_checkpoint_missing(tmp_path, capsys):
    path = write_spec(tmp_path, model={**RESNET, "checkpoint": str(tmp_path / "none.pt")},
                      inputs=IMAGE, tasks=TASKS)
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "model.checkpoint", "not found")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_with_mismatched_keys_and_shapes(tmp_path, capsys, suffix):
    state = small_resnet(num_classes=5, width=8).state_dict()  # 5 classes: head shapes differ
    state["extra.weight"] = torch.zeros(1)
    del state["conv1.weight"]
    ckpt = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save(state, ckpt)
    else:
        from safetensors.torch import save_file

        save_file(state, str(ckpt))
    path = write_spec(tmp_path, model={**RESNET, "checkpoint": str(ckpt)}, inputs=IMAGE,
                      tasks=TASKS)
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "does not fit the model", "1 missing key(s) (e.g. conv1.weight)",
                    "1 unexpected key(s) (e.g. extra.weight)", "shape mismatch")


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("garbage.pt", bytes(range(256)) * 4, "it is not a torch checkpoint (no readable pickle"),
    ("zeros.pt", bytes(64), "it is not a torch checkpoint (no readable pickle"),
    ("cut.pt", None, "cannot read checkpoint"),
    ("cut.safetensors", None, "Error while deserializing header"),
])
def test_a_truncated_or_garbage_checkpoint_is_one_line(tmp_path, capsys, name, content,
                                                        needle):
    ckpt = tmp_path / name
    if content is None:  # a real checkpoint cut short
        whole = tmp_path / f"whole{ckpt.suffix}"
        state = small_resnet(num_classes=3, width=8).state_dict()
        if ckpt.suffix == ".pt":
            torch.save(state, whole)
        else:
            from safetensors.torch import save_file

            save_file(state, str(whole))
        content = whole.read_bytes()[:300]
    ckpt.write_bytes(content)
    path = write_spec(tmp_path, model={**RESNET, "checkpoint": str(ckpt)}, inputs=IMAGE,
                      tasks=TASKS)
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "model.checkpoint", needle)


def test_checkpoint_that_fits_is_loaded(tmp_path, capsys):
    model = small_resnet(num_classes=3, width=8)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    path = write_spec(tmp_path, model={**RESNET, "checkpoint": str(tmp_path / "ok.pt")},
                      inputs=IMAGE, tasks=TASKS, select={"layers": ["layer4.*"]})
    code, _, _ = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "o" / "weights.safetensors"))
    assert torch.equal(weights["conv1.weight"], model.conv1.weight)
    assert torch.equal(weights["layer4.left.0.conv1.weight"], model.layer4[0].conv1.weight)


def test_layer_pattern_matching_nothing(tmp_path, capsys, monkeypatch):
    from reconfx import pipeline

    traced = []
    monkeypatch.setattr(pipeline, "trace", lambda *a, **k: traced.append(1))
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=TASKS,
                      select={"layers": ["layr4.*"]})
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(err, "select.layers", "pattern 'layr4.*' names no module or parameter of "
                    "the model", "did you mean 'layer4'", "reconfx inspect")
    assert not traced  # refused before tracing


def test_include_naming_nothing_is_refused_before_tracing(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=TASKS,
                      select={"layers": ["layer4"], "exclude": ["layer4.0.bn9"]})
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(err, "select.exclude", "pattern 'layer4.0.bn9'", "did you mean")


@pytest.mark.parametrize(("field", "factory", "needle"), [
    ("model", "no_such_package.models:build", "cannot import 'no_such_package.models'"),
    ("model", "reconfx.zoo:no_such_model", "'reconfx.zoo' has no attribute 'no_such_model'"),
    ("data", "no_such_package.data:load", "cannot import 'no_such_package.data'"),
])
def test_validate_imports_the_factories_it_names(tmp_path, capsys, field, factory, needle):
    fields = {"model": {**RESNET}, "inputs": IMAGE, "tasks": TASKS}
    if field == "model":
        fields["model"]["factory"] = factory
    else:
        fields["data"] = {"factory": factory}
    path = write_spec(tmp_path, **fields)
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, f"{path}: {field}.factory", needle)


@pytest.mark.parametrize(("tasks", "train", "field", "needle"), [
    ([{"name": "left", "loss": "crossentropy"}, {"name": "right"}], {}, "tasks[0].loss",
     "unknown loss 'crossentropy' (fix: one of cross_entropy, mse"),
    ([{"name": "left"}, {"name": "right", "metric": "acc"}], {}, "tasks[1].metric",
     "unknown metric 'acc' (fix: one of accuracy, miou, mse, mae"),
    ([{"name": "left", "loss": "reconfx.zoo:no_such_loss"}, {"name": "right"}], {},
     "tasks[0].loss", "'reconfx.zoo' has no attribute 'no_such_loss'"),
    (TASKS, {"aggregator": "pcgradd"}, "train.aggregator",
     "unknown aggregator 'pcgradd': one of ew, mean, pcgrad"),
])
@pytest.mark.parametrize("command", ["validate", "run", "profile"])
def test_misspelt_losses_metrics_and_aggregators_fail_before_tracing(tmp_path, capsys, monkeypatch,
                                                                     tasks, train, field, needle,
                                                                     command):
    def no_tracing(*args, **kwargs):
        raise AssertionError("traced a spec that names an unknown objective")

    monkeypatch.setattr("reconfx.commands.prepare", no_tracing)
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=tasks, train=train,
                      data={"factory": "reconfx.data:multidigits"})
    argv = [command, str(path)] + ([] if command == "validate" else ["--out", str(tmp_path / "o")])
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line(err, f"{path}", field, needle)
    assert not (tmp_path / "o").exists()


def test_layer_used_by_one_task_only(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=TASKS,
                      select={"layers": ["heads.left"]})
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(err, "used by task 'left' only")


def test_task_not_among_outputs(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE,
                      tasks=[{"name": "left"}, {"name": "middle"}])
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "tasks[1].name", "task 'middle' is not among the model's outputs",
                    "left, right")


def test_single_tensor_output_for_several_tasks(tmp_path, capsys):
    path = write_spec(tmp_path, model={"factory": "tests.models:SingleOutput"},
                      inputs=[{"name": "x", "shape": [2, 4]}], tasks=TASKS)
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "returns a single tensor")


def test_model_neither_tier_can_trace(tmp_path, capsys):
    path = write_spec(tmp_path, model={"factory": "tests.models:DataDependent"},
                      inputs=[{"name": "x", "shape": [2, 4]}], tasks=[{"name": "a"}, {"name": "b"}])
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    source = (Path(__file__).parent / "models.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if "if h.sum() > 0" in text)
    assert_one_line(err, "neither tier can trace the model", "fx:", "torch.export:",
                    f"tests/models.py:{line}")


def test_profile_based_policy_without_a_profile(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=TASKS, select={"top_k": 3})
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line(err, "select.top_k", "select.layers")


def test_spec_file_missing(tmp_path, capsys):
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert_one_line(err, "nope.yaml", "not found")


@pytest.mark.parametrize("command", ["validate", "compile"])
def test_a_folder_given_as_the_spec(tmp_path, capsys, command):
    code, _, err = run_cli(capsys, command, str(tmp_path))
    assert code == 2
    assert_one_line(err, f"{tmp_path}: is a folder, not a spec file (fix: pass the spec's .yaml")


@pytest.mark.parametrize("name", ["my-task", "training", "class"])
def test_task_names_must_be_usable_as_attributes(tmp_path, capsys, name):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE,
                      tasks=[{"name": name}, {"name": "right"}])
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, "tasks[0].name")


@pytest.mark.parametrize("inputs, needles", [
    # the MLP takes 1 x 12 x 12 images: three channels are the spec's fault, not an internal
    # error
    ([{"name": "image", "shape": [2, 3, 12, 12]}],
     ["inputs: the model raises RuntimeError on the example inputs (image [2, 3, 12, 12] "
      "float32)", "check the inputs' names"]),
    # a misspelled input name reaches forward() as an unexpected keyword
    ([{"name": "img", "shape": [2, 1, 12, 12]}],
     ["the model raises TypeError", "img [2, 1, 12, 12]", "unexpected keyword argument 'img'"]),
    # the height is fixed by the first Linear's input features: it cannot be dynamic
    ([{"name": "image", "shape": [2, 1, 12, 12], "dynamic": [0, 2]}],
     ["the model runs on the example inputs but raises RuntimeError when their dynamic axes "
      "(image: [0, 2]) take a second size (image [3, 1, 16, 12] float32)",
      "mark as dynamic only the axes whose size may change"]),
])
def test_model_that_fails_on_the_spec_inputs(tmp_path, capsys, inputs, needles):
    path = write_spec(tmp_path, model={"factory": "tests.models:DigitsMLP"}, inputs=inputs,
                      tasks=TASKS, select={"layers": ["trunk"]})
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, f"{path}: inputs: ", *needles)


def test_backbone_that_fails_on_the_spec_inputs(tmp_path, capsys):
    path = write_spec(tmp_path, backbone={**RESNET, "feature": "output"},
                      inputs=[{"name": "image", "shape": [2, 3, 12, 12]}],
                      tasks=[{"name": "left", "head": {"out_features": 2}},
                             {"name": "right", "head": {"out_features": 2}}])
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, f"{path}: inputs: the model raises RuntimeError on the example inputs")


def test_top_level_names_a_graph_module_reserves(tmp_path, capsys):
    path = write_spec(tmp_path, model={"factory": "tests.models:GraphNamed"},
                      inputs=[{"name": "x", "shape": [2, 4]}], tasks=[{"name": "a"}, {"name": "b"}])
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert code == 2
    assert_one_line(err, "top-level attribute(s) 'graph', 'meta' have the name of a torch.fx "
                    "GraphModule attribute", "give the model as a `backbone:` tapped at its "
                    "output or an output field")
    tapped = write_spec(tmp_path, "tapped", inputs=[{"name": "x", "shape": [2, 4]}],
                        backbone={"factory": "tests.models:GraphNamed", "feature": "graph"},
                        tasks=[{"name": "a", "head": {"out_features": 2}},
                               {"name": "b", "head": {"out_features": 3}}])
    code, _, err = run_cli(capsys, "inspect", str(tapped))
    assert code == 2
    assert_one_line(err, "'graph', 'meta' have the name", "instead of 'graph'")


def test_reserved_top_level_names_work_inside_a_backbone(tmp_path):
    """The fix the error names: as a backbone tapped at an output field, the same modules live
    under 'backbone.'."""
    from tests.support import compile_and_verify

    path = write_spec(tmp_path, "wrapped",
                      backbone={"factory": "tests.models:GraphNamed", "feature": "a"},
                      inputs=[{"name": "x", "shape": [2, 4]}],
                      tasks=[{"name": "a", "head": {"out_features": 2}},
                             {"name": "b", "head": {"out_features": 3}}],
                      select={"layers": ["backbone.graph"]})
    compiled = compile_and_verify(path, tmp_path / "out")
    assert [layer.name for layer in compiled.branched.layers] == ["backbone.graph"]


@pytest.mark.parametrize(("split", "how", "needles"), [
    ("val", "empty", ["data.kwargs", "returned an empty 'val' split", "fix: check the factory's"]),
    ("test", "empty", ["returned an empty 'test' split"]),
    ("train", "empty", ["returned an empty 'train' split"]),
    ("train", "iterable", ["data.factory", "returned IterableDigits, not a map-style Dataset"]),
    ("val", "tuples", ["data.factory", "items of the 'val' split are tuples of Tensor, Tensor, "
                       "Tensor, not (inputs, targets) pairs of dicts"]),
    ("train", "float64", ["data.factory", "input 'image' of the 'train' split is float64, and "
                          "the spec declares float32", "fix: make the factory return what "
                          "inputs[] declares for 'image'"]),
])
def test_broken_data_splits_are_one_line_errors(tmp_path, capsys, split, how, needles):
    """An empty split used to train nothing and report 0.0000 (or 'best val 0.0000'); other
    shapes of data, and float64 images for a float32 model, were internal errors."""
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE,
                      tasks=[{"name": "left", "loss": "cross_entropy"},
                             {"name": "right", "loss": "cross_entropy"}],
                      data={"factory": "tests.models:broken_split",
                            "kwargs": {"broken": split, "how": how, "size": 64},
                            "batch_size": 16},
                      select={"layers": ["layer4.*"]}, train={"epochs": 1},
                      export={"dir": str(tmp_path / "out")})
    code, _out, err = run_cli(capsys, "run", str(path), "--quiet")
    assert code == 2
    assert_one_line(err, "tests.models:broken_split", *needles)


TEXT = {"factory": "reconfx.zoo:minilm", "feature": "last_hidden_state"}
IDS = {"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 30522, "dynamic": [0, 1]}
MASK = {"name": "attention_mask", "shape": [2, 8], "dtype": "int64", "dynamic": [0, 1],
        "mask_of": "input_ids"}


@pytest.mark.parametrize(("inputs", "head", "needles"), [
    ([IDS], {"out_features": 2, "pool": "mean", "mask": "attention_mask"},
     ["tasks[1].head.mask: 'attention_mask' is not an input (inputs: input_ids)",
      "mask_of: input_ids"]),
    ([IDS, MASK], {"out_features": 2, "pool": "cls", "mask": "attention_mask"},
     ["tasks[1].head: a mask applies to pool: mean or max"]),
    ([IDS, {**MASK, "mask_of": "attention_mask"}], {"out_features": 2},
     ["inputs[1].mask_of: 'attention_mask' is not another input"]),
    ([IDS, {**MASK, "shape": [2, 9]}], {"out_features": 2},
     ["inputs[1]: mask 'attention_mask' has shape [2, 9]", "needs shape [2, 8]"]),
])
def test_masks_that_do_not_fit_the_inputs(tmp_path, capsys, inputs, head, needles):
    path = write_spec(tmp_path, backbone=TEXT, inputs=inputs,
                      tasks=[{"name": "ner", "head": {"out_features": 3}},
                             {"name": "sentiment", "head": head}])
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_line(err, str(path), *needles)


def test_a_loss_that_cannot_compare_output_and_target_names_the_spec_and_the_field(tmp_path,
                                                                                 capsys):
    """Class scores per image against per-pixel label maps (a classification model given the
    segmentation variant of the data): raised inside training, located in the spec."""
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE, tasks=[
        {"name": "left", "loss": "cross_entropy"}, {"name": "right", "loss": "cross_entropy"}],
        data={"factory": "reconfx.data:multidigits", "kwargs": {"dense": True, "size": 64}},
        profile={"steps": 2}, select={"top_k": 1})
    code, _, err = run_cli(capsys, "profile", str(path), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2
    assert_one_line(err, f"reconfx: error: {path}: tasks[0].loss: the loss of task 'left' cannot "
                    "compare the model's output (64, 3) torch.float32 with the target (64, 12, 12) "
                    "torch.int64")


def test_a_layer_inside_a_leaf_tracing_keeps_whole_is_refused_naming_the_leaf(tmp_path, capsys):
    """compile explains an opaque leaf itself, as inspect's notes do: the leaf, why tracing kept
    it whole, and what can be selected instead; selecting the leaf whole compiles."""
    fields = dict(model={"factory": "tests.models:WithGate"},
                  inputs=[{"name": "x", "shape": [2, 4]}], tasks=[{"name": "a"}, {"name": "b"}])
    path = write_spec(tmp_path, select={"layers": ["gate.down"]}, **fields)
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line(err, "select.layers: pattern 'gate.down' matches no shared layer: it lies "
                    "inside 'gate' (Gate), which tracing keeps as one leaf (fx could not trace "
                    "'gate'", "it is kept as one leaf; tier 2 failed too (torch.export: ",
                    "so only the whole leaf can be branched",
                    "(fix: select 'gate' whole, or make its forward traceable")
    path = write_spec(tmp_path, select={"layers": ["gate"]}, **fields)
    code, _, err = run_cli(capsys, "compile", str(path), "--out", str(tmp_path / "out"))
    assert code == 0, err
