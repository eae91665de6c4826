"""A slot for what one forward pass leaves behind (its metrics, its
auxiliary loss) that copying and pickling do not carry.

A module keeps the metrics of its last forward for the caller to read. Those
tensors are part of that step's autograd graph, and `copy.deepcopy` refuses
non-leaf tensors, so a model that stored them in a plain attribute could not
be copied after a training forward (timm's `ModelEmaV3`, torch's
`AveragedModel`). A `Transient` copies and pickles as an empty slot: a copy
of a module starts with no last forward, as a freshly built one does.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Transient(Generic[T]):
    """Holds `value`; a deep copy or an unpickled copy holds `make()` instead."""

    __slots__ = ("make", "value")

    def __init__(self, make: Callable[[], T]) -> None:
        self.make = make
        self.value: T = make()

    def __deepcopy__(self, memo: dict[int, Any]) -> "Transient[T]":  # noqa: ARG002 - copy's signature
        return Transient(self.make)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Transient, (self.make,))
