"""Masks and padding: the pretrained MiniLM with an attention mask, a sentence head pooling over
the real tokens only, and a loader that pads variable-length sentences and builds their masks.
Padding a batch must not change any task's output at the real positions (1e-5), in PyTorch,
in the emitted model and in ONNX."""

import numpy as np
import pytest
import torch

import reconfx
from reconfx.cli import main
from reconfx.data.padding import IGNORE, Collate
from reconfx.errors import ModelError
from reconfx.heads import Pool
from reconfx.spec import InputSpec
from reconfx.train.objectives import METRICS
from tests.support import compile_and_verify, write_spec
from tests.text_data import Sentences

IDS = {"name": "input_ids", "shape": [2, 16], "dtype": "int64", "high": 30522,
       "dynamic": [0, 1], "pad": 0}
MASK = {"name": "attention_mask", "shape": [2, 16], "dtype": "int64", "dynamic": [0, 1],
        "mask_of": "input_ids"}
HEADS = [{"name": "ner", "loss": "cross_entropy", "head": {"out_features": 9}},
         {"name": "sentiment", "loss": "cross_entropy",
          "head": {"type": "mlp", "hidden": [16], "out_features": 2, "pool": "mean",
                   "mask": "attention_mask"}},
         {"name": "topic", "loss": "cross_entropy",
          "head": {"out_features": 3, "pool": "max", "mask": "attention_mask"}}]


def padded_spec(tmp_path, **fields):
    return write_spec(tmp_path, "padded",
                      backbone={"factory": "reconfx.zoo:minilm", "feature": "last_hidden_state"},
                      inputs=[IDS, MASK], tasks=HEADS,
                      select={"layers": ["backbone.encoder.layer.5.*"]}, **fields)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("padded")
    path = padded_spec(folder, export={"formats": ["python", "onnx"]})
    return compile_and_verify(path, folder / "out"), folder / "out"


def sentences(lengths, pad_to):
    """Token ids of sentences of the given lengths, padded to ``pad_to``, and their mask."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    mask = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1000, 2000, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    return ids, mask


def assert_padding_changes_nothing(run, lengths=(7, 12)):
    """Each sentence alone (unpadded) and in a batch padded 5 beyond the longest: the same
    outputs at its real tokens and the same sentence outputs."""
    ids, mask = sentences(lengths, max(lengths) + 5)
    batched = run(ids, mask)
    for i, n in enumerate(lengths):
        alone = run(ids[i:i + 1, :n], mask[i:i + 1, :n])
        for task in ("sentiment", "topic"):
            assert torch.allclose(torch.as_tensor(batched[task][i]),
                                  torch.as_tensor(alone[task][0]), atol=1e-5, rtol=0), task
        assert torch.allclose(torch.as_tensor(batched["ner"][i, :n]),
                              torch.as_tensor(alone["ner"][0]), atol=1e-5, rtol=0)


def test_padding_changes_no_output_of_the_compiled_and_the_emitted_model(compiled):
    result, out = compiled
    for model in (result.prepared.model, result.branched.module, reconfx.load(out)):
        model.eval()
        with torch.no_grad():
            assert_padding_changes_nothing(
                lambda ids, mask, m=model: m(input_ids=ids, attention_mask=mask))


def test_padding_changes_no_output_in_onnx(compiled):
    import onnxruntime as ort

    _result, out = compiled
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(ids, mask):
        values = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        return {name: torch.from_numpy(np.asarray(v)) for name, v in zip(names, values,
                                                                         strict=True)}

    assert_padding_changes_nothing(run)


def test_the_mask_goes_to_the_backbone_and_to_the_pooling_heads(compiled):
    _result, out = compiled
    source = (out / "model.py").read_text()
    assert 'self.pools.sentiment = Pool("mean", (1,))' in source
    assert "self.pools.sentiment(encoder_layer_5_sentiment, attention_mask)" in source
    assert "self.pools.topic(encoder_layer_5_topic, attention_mask)" in source
    assert "self.heads.sentiment = nn.Sequential(nn.Linear(384, 16), nn.ReLU()" in source


def test_masked_pools_leave_out_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mean, top = Pool("mean", (1,)), Pool("max", (1,))
    assert torch.allclose(mean(x, mask)[0], x[0, :3].mean(0))
    assert torch.equal(top(x, mask)[0], x[0, :3].amax(0))
    assert torch.allclose(mean(x, mask)[1], x[1].mean(0))


def test_the_loader_pads_items_and_builds_their_masks():
    collate = Collate([InputSpec(**IDS), InputSpec(**MASK)])
    items = [({"input_ids": torch.tensor([101, 5, 102])},
              {"ner": torch.tensor([1, 2, 3]), "sentiment": torch.tensor(1)}),
             ({"input_ids": torch.tensor([101, 7, 8, 9, 102])},
              {"ner": torch.tensor([4, 5, 6, 7, 8]), "sentiment": torch.tensor(0)})]
    inputs, targets = collate(items)
    assert inputs["input_ids"].tolist() == [[101, 5, 102, 0, 0], [101, 7, 8, 9, 102]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert inputs["attention_mask"].dtype == torch.int64
    assert targets["ner"].tolist() == [[1, 2, 3, IGNORE, IGNORE], [4, 5, 6, 7, 8]]
    assert targets["sentiment"].tolist() == [1, 0]


def test_a_ragged_batch_without_a_pad_value_is_refused_naming_the_field():
    ids = {**IDS}
    del ids["pad"]
    collate = Collate([InputSpec(**ids)], "text.yaml")
    items = [({"input_ids": torch.tensor([1, 2])}, {}), ({"input_ids": torch.tensor([1])}, {})]
    with pytest.raises(ModelError) as err:
        collate(items)
    assert str(err.value).startswith("text.yaml: inputs[0].pad: input 'input_ids' has items of "
                                     "different shapes in one batch ((1,) and (2,))")
    assert "fix: set inputs[0].pad" in str(err.value)


def test_run_trains_on_variable_length_sentences(tmp_path, capsys):
    out = tmp_path / "out"
    path = padded_spec(tmp_path, data={"factory": "tests.text_data:sentences",
                                       "kwargs": {"size": 24}, "batch_size": 8},
                       train={"epochs": 1, "lr": 1e-3}, export={"dir": str(out)})
    assert main(["run", str(path), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    # Token accuracy over padded batches counts the real tokens only: the same as item by item.
    row = next(line for line in report.splitlines() if line.startswith("| ner | accuracy |"))
    model = reconfx.load(out).eval()
    right = total = 0
    with torch.no_grad():
        for inputs, targets in Sentences("test", 0, size=24):
            ids = inputs["input_ids"][None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))["ner"][0]
            right += int((logits.argmax(-1) == targets["ner"]).sum())
            total += len(targets["ner"])
    assert row.split("|")[3].strip() == f"{right / total:.4f}"
    assert_padding_changes_nothing(
        lambda ids, mask: model.eval()(input_ids=ids, attention_mask=mask), lengths=(4, 9))


def test_token_accuracy_leaves_out_padding():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [5.0, 0.0]]])  # predicts 1, 0, 0
    labels = torch.tensor([[1, 1, IGNORE]])
    accuracy = METRICS["accuracy"]
    assert int(accuracy.total(logits, labels)) == 1 and accuracy.count(logits, labels) == 2


def test_a_mask_only_the_heads_read_stays_out_of_the_backbone(tmp_path):
    path = write_spec(tmp_path, "heads-only",
                      backbone={"factory": "tests.models:TokenEncoder"},
                      inputs=[{**IDS, "high": 50, "shape": [2, 6]},
                              {**MASK, "shape": [2, 6], "to_backbone": False}],
                      tasks=[{"name": "tag", "head": {"out_features": 3}},
                             {"name": "mean", "head": {"out_features": 2, "pool": "mean",
                                                       "mask": "attention_mask"}},
                             {"name": "top", "head": {"out_features": 2, "pool": "max",
                                                      "mask": "attention_mask"}}],
                      select={"layers": ["backbone.out"]})
    result = compile_and_verify(path, tmp_path / "out")
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    for model in (result.branched.module, reconfx.load(tmp_path / "out")):
        with torch.no_grad():
            batched = model.eval()(input_ids=ids, attention_mask=mask)
            alone = model(input_ids=ids[:1, :3], attention_mask=mask[:1, :3])
        for task in ("mean", "top"):
            assert torch.allclose(batched[task][0], alone[task][0], atol=1e-6, rtol=0)
    source = (tmp_path / "out" / "model.py").read_text()
    assert "self.backbone.embed(input_ids)" in source  # the backbone never sees the mask
