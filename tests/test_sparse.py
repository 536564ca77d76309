"""Sparse training: per-neuron top-K masks; masked weights never move, under every aggregator
and with optimiser state (momentum, Adam moments, weight decay)."""

import pytest
import torch

from reconfx.layers import inventory
from reconfx.train.aggregators import AGGREGATORS, aggregator
from reconfx.train.objectives import loss_functions
from reconfx.train.sparse import SparseMask, neuron_masks
from reconfx.train.step import MultiTaskStep, layer_parameters
from tests.test_train import batch, branched  # noqa: F401  (the fixture)


def test_each_output_neuron_keeps_its_k_largest_inputs():
    weight = torch.nn.Parameter(torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -0.2, 1.0]]))
    (mask,) = neuron_masks([weight], per_neuron_k=2).values()
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    conv = torch.nn.Conv2d(3, 5, 3)
    (mask,) = neuron_masks([conv.weight], fraction=0.3).values()
    assert mask.reshape(5, -1).sum(1).tolist() == [9] * 5  # ceil(0.3 * 27)
    assert neuron_masks([conv.bias], fraction=0.3) == {}  # 1-D parameters stay trainable


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_weights_do_not_move(branched, name, optimizer):  # noqa: F811
    s, compiled, data = branched
    module = compiled.module
    layers = inventory(module, s.task_names)
    shared = [x for x in layers if x.shared]
    params = [p for layer in shared for p in layer_parameters(module, layer)]
    sparse = SparseMask(params, neuron_masks(params, fraction=0.3))
    trainable = [p for p in module.parameters()]
    opt = (torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=0.1)
           if optimizer == "sgd" else torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1))
    step = MultiTaskStep(module, shared, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), "s"),
                         aggregate=aggregator(name, 2), optimizer=opt, sparse=sparse)
    before = {id(p): p.detach().clone() for p in params}
    for _ in range(3):
        step(*batch(data))
    moved = 0
    for p, mask, _ in sparse.entries:
        assert torch.equal(p.detach()[~mask], before[id(p)][~mask])
        moved += int((p.detach()[mask] != before[id(p)][mask]).sum())
    assert moved > 0
    assert 0.29 < sparse.trainable_fraction < 0.35
