"""A compile runs the same reference models on the same examples many times (tracing's
acceptance, I1, collapsing calls, task rows, I4) and looks up constructors and settings for
repeated layers: what is reused, and what must never be."""

from __future__ import annotations

import torch
from torch import nn

from reconfx.emit import constructors
from reconfx.emit.sources import object_source, settings_key
from reconfx.modes import preserved, reusing, run


class Counted(nn.Module):
    """Conv, BatchNorm and dropout; counts its forward passes (in a list: a counter attribute
    would itself be state that differs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.log: list[int] = []

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        self.log.append(1)
        return {"a": self.drop(self.norm(self.conv(image))).mean((2, 3))}


def example() -> dict[str, torch.Tensor]:
    return {"image": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}


def test_preserved_restores_running_statistics_a_kernel_changed_without_a_version_bump():
    model, x = Counted(), example()
    before = model.norm.running_mean.clone()
    version = model.norm.running_mean._version
    with preserved(model):
        model.train()(**x)
        assert model.norm.running_mean._version == version  # (the kernel did not move it)
        assert not torch.equal(model.norm.running_mean, before)
    assert torch.equal(model.norm.running_mean, before)


def test_a_second_pass_in_the_same_state_is_reused_and_any_change_runs_again():
    model, x = Counted(), example()
    with reusing():
        first = run(model, x, True)
        assert torch.equal(run(model, x, True)["a"], first["a"]) and len(model.log) == 1
        run(model, x, False)  # another mode: another pass
        assert len(model.log) == 2
        with torch.no_grad():
            model.conv.weight.mul_(2)  # a parameter changed in place
        assert not torch.equal(run(model, x, True)["a"], first["a"]) and len(model.log) == 3
        model.norm.running_var.data.mul_(3)  # a buffer changed behind its version counter
        run(model, x, False)
        assert len(model.log) == 4
        model.drop.p = 0.0  # an attribute: in train mode it matters
        run(model, x, True)
        assert len(model.log) == 5
        model.drop.p = 0.2  # in eval mode torch's dropout is the identity whatever p is
        run(model, x, False)
        assert len(model.log) == 5
        run(model, example(), False)  # another example object: another pass
        assert len(model.log) == 6


def test_a_pass_with_hooks_or_outside_reusing_always_runs():
    model, x = Counted(), example()
    seen = []
    handle = model.conv.register_forward_hook(lambda *_args: seen.append(1))
    with reusing():
        run(model, x, False)
        run(model, x, False)
    handle.remove()
    assert len(seen) == 2 and len(model.log) == 2
    run(model, x, False)
    run(model, x, False)
    assert len(model.log) == 4


def test_a_pass_asked_for_its_autograd_graph_runs_and_keeps_it():
    model, x = Counted(), example()
    with reusing():
        assert run(model, x, True)["a"].grad_fn is None  # (reusable outputs come detached)
        assert run(model, x, True, graph=True)["a"].grad_fn is not None
    assert len(model.log) == 2


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": torch.relu(self.conv(image))}


def test_a_graph_module_recompiled_with_other_code_runs_again():
    model, x = Plain(), example()
    traced = torch.fx.symbolic_trace(model)
    with reusing():
        assert torch.equal(run(traced, x, False)["a"], model(**x)["a"])
        relu = next(n for n in traced.graph.nodes if n.target is torch.relu)
        with traced.graph.inserting_after(relu):
            squashed = traced.graph.call_function(torch.sigmoid, (relu,))
        relu.replace_all_uses_with(squashed, delete_user_cb=lambda user: user is not squashed)
        traced.recompile()
        assert torch.equal(run(traced, x, False)["a"], torch.sigmoid(model(**x)["a"]))


def test_constructors_are_looked_up_once_per_kind_of_layer(monkeypatch):
    from transformers import BertConfig

    config = BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                        intermediate_size=16)
    copy = BertConfig.from_dict(config.to_dict())
    other = BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                       intermediate_size=32)
    assert settings_key(config) == settings_key(copy) != settings_key(other)
    assert settings_key(nn.Linear(2, 2)) is None
    assert object_source(config).text == object_source(copy).text != object_source(other).text

    searched = []
    found = constructors._constructor
    monkeypatch.setattr(constructors, "_constructor",
                        lambda m, settings: searched.append(m) or found(m, settings))
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(4, 4, bias=False),
              nn.Linear(4, 4, dtype=torch.float64)]
    with constructors.remembered():
        calls = [constructors.constructor(m).call for m in layers]
    assert calls == ["nn.Linear(4, 4)", "nn.Linear(4, 4)", "nn.Linear(4, 5)",
                     "nn.Linear(4, 4, bias=False)", "nn.Linear(4, 4, dtype=torch.float64)"]
    assert len(searched) == 4  # the second Linear(4, 4) reused the first's
    searched.clear()
    constructors.constructor(layers[1])
    assert len(searched) == 1  # (outside remembered(), every call searches)
