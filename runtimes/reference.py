"""Pure-torch kernels for every sparsecc op: the semantics every other runtime is checked against. Each
pattern defines its op's reference kernel (`sparsecc.patterns`); this runtime runs all of them, in every
floating dtype."""

from __future__ import annotations

from typing import Optional

import torch

from sparsecc import patterns

NAME = "reference"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def unavailable() -> Optional[str]:
    return None


KERNELS = patterns.OpTable(lambda op: op.reference)
