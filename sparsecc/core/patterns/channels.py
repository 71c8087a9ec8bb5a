"""Channel-structured masks: whole input channels are zero and the kept ones are dense in every live row. They
condense with the fan-in ops (every live row reads the same kept inputs); narrowing can remove the unused
channels from the producer of this layer's input."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsecc.core import reductions
from sparsecc.core.patterns import fanin
from sparsecc.core.patterns.base import Pattern
from sparsecc.core.structures import ChannelStructured, Structure


def detect(fqn: str, mask: Tensor) -> Optional[Structure]:
    per_channel = reductions.used_inputs(mask)
    if reductions.all_set(per_channel):
        return None
    ablated = fanin.ablated(mask)
    live = torch.ones(mask.shape[0], dtype=torch.bool)
    live[list(ablated)] = False
    kept = mask[live][:, per_channel]
    if kept.numel() == 0 or not reductions.all_set(kept):
        return None
    return ChannelStructured(tuple(int(c) for c in torch.nonzero(per_channel).flatten()), ablated)


PATTERN = Pattern("channels", ChannelStructured, detect, {"linear": fanin.linear_rule, "conv2d": fanin.conv2d_rule})
