"""Data sets for specs (``data.factory``): ``factory(split, seed, **kwargs)`` returns a Dataset of
``(inputs: dict[str, Tensor], targets: dict[str, Tensor])``."""

from reconfx.data.multidigits import MultiDigits, multidigits
from reconfx.data.multifashion import MultiFashionMNIST, multi_fashion_mnist

__all__ = ["MultiDigits", "MultiFashionMNIST", "multi_fashion_mnist", "multidigits"]
