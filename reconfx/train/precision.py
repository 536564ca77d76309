"""Where and in what precision training runs: ``train.device`` and ``train.precision``.

``bf16``/``fp16`` wrap the forward pass and the losses in ``torch.autocast``; parameters, their
gradients, the T×P gradient buffer and the conflict statistics stay float32. ``fp16`` adds
dynamic loss scaling (the losses are multiplied by a scale before the per-task backward passes;
the gradients are unscaled before aggregation, a step whose gradients overflow is skipped and the
scale halved, and it doubles after 2,000 clean steps, as ``torch.amp.GradScaler`` does). Deciding
to skip a step reads one flag on the host, so fp16 costs one more synchronisation per step.
"""

from __future__ import annotations

import contextlib

import torch

from reconfx.distributed import world
from reconfx.errors import SpecError

__all__ = [
    "autocast", "DTYPES", "LossScaler", "resolve_device"
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, where: str = "spec") -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; ``cuda`` without one is an error.
    Under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    if name == "cuda":
        raise SpecError("train.device is cuda and no CUDA device is visible to torch",
                        where=f"{where}: train.device",
                        fix="use device: auto (CPU when there is no GPU) or install a CUDA build "
                            "of torch")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16 (a no-op object for other precisions)."""

    def __init__(self, device: torch.device, enabled: bool, initial: float = 2.0 ** 16,
                 growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = torch.full((), initial, dtype=torch.float32, device=device)
        self.growth = torch.zeros((), dtype=torch.int32, device=device)
        self.interval = growth_interval

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        return losses * self.scale if self.enabled else losses

    def unscale(self, tensors: list[torch.Tensor], last: bool = True) -> bool:
        """Divide ``tensors`` by the scale in place; True when a gradient overflowed: the step
        must be skipped, and the scale is halved. The scale grows (every ``growth_interval``
        steps without overflow) at the step's ``last`` call, one per part of the gradients."""
        if not self.enabled:
            return False
        found = torch.zeros(1, dtype=torch.float32, device=self.scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self.scale.reciprocal())
        overflow = bool(found.item())
        if overflow or last:
            torch._amp_update_scale_(self.scale, self.growth, found, 2.0, 0.5, self.interval)
        return overflow

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "growth": self.growth}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale.copy_(state["scale"])
        self.growth.copy_(state["growth"])
