"""A model no exporter can translate whole: a Linear between two custom ops (shared by the ONNX and TVM
export tests; in its own module so the ops register once per process)."""

import torch
from torch import nn


@torch.library.custom_op("sparsecc_test::first_unknown", mutates_args=())
def _first_unknown(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_first_unknown.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("sparsecc_test::second_unknown", mutates_args=())
def _second_unknown(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@_second_unknown.register_fake
def _(x):
    return torch.empty_like(x)


class Unexportable(nn.Module):
    """A Linear between two custom ops that no exporter translates: the "list every missing op" checks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return _second_unknown(self.fc(_first_unknown(x)))
