"""Data sets for specs (``data.factory``): ``factory(split, seed, **kwargs)`` returns a Dataset of
``(inputs: dict[str, Tensor], targets: dict[str, Tensor])``."""

from reconfx.data.multidigits import MultiDigits, multidigits

__all__ = ["MultiDigits", "multidigits"]
