"""A stand-in for CUDA in tests on machines without a GPU: tensors on torch's
``meta`` device (shapes and strides, no data) cross processes through the
plane's device path, with tokens this module makes. What it records shows
what the plane did: which storages were opened, settled and waited for."""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any

import torch

from atoll.tensors import _devices


class FakeDeviceOps:
    def __init__(self) -> None:
        self._serials: dict[int, tuple[weakref.ref[Any], int]] = {}
        self._next = itertools.count(1).__next__
        self.opened: list[tuple[int, int]] = []  # identities opened here
        self.settled: list[tuple[int, int]] = []
        self.waited: list[Any] = []
        self.marked = 0

    def export(self, storage: Any) -> tuple[Any, ...]:
        known = self._serials.get(id(storage))
        if known is None or known[0]() is not storage:
            known = self._serials[id(storage)] = (weakref.ref(storage), self._next())
        return (0, os.getpid(), known[1], storage.nbytes())

    def identity(self, token: tuple[Any, ...]) -> Any:
        return (token[1], token[2])

    def open(self, token: tuple[Any, ...]) -> Any:
        self.opened.append((token[1], token[2]))
        return torch.UntypedStorage(token[3], device="meta")

    def settle(self, token: tuple[Any, ...]) -> None:
        self.settled.append((token[1], token[2]))

    def marker(self, device: int) -> Any:
        self.marked += 1
        return [os.getpid(), self.marked]

    def wait(self, device: int, marker: Any) -> None:
        self.waited.append(tuple(marker))


OPS = FakeDeviceOps()
_devices.register("meta", OPS)
