"""Example inputs as one call of the model: positional and keyword arguments. Hugging Face models are called
with keywords (``input_ids=..., attention_mask=...``); everything that runs the model on example inputs (narrowing,
capture, tuning, validation) runs it through a `Call`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import Tensor
from torch.utils import _pytree as pytree


def as_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple: None -> (), one tensor -> (tensor,), a list -> a tuple."""
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@dataclass(frozen=True)
class Call:
    """``model(*args, **kwargs)``, kept to be run again."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: Any, kwargs: Optional[Mapping[str, Any]] = None) -> "Call":
        """A call from what users pass: a `Call`, a tuple or list of positional inputs, one tensor, or None;
        plus keyword inputs."""
        if isinstance(inputs, Call):
            return inputs if not kwargs else cls(inputs.args, {**inputs.kwargs, **kwargs})
        return cls(as_tuple(inputs), dict(kwargs or {}))

    def __call__(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)

    def __bool__(self) -> bool:
        return bool(self.args or self.kwargs)

    @property
    def tree(self) -> tuple:
        """Everything passed, as one pytree: the positional inputs, then the keyword dict when there is one."""
        return (*self.args, dict(self.kwargs)) if self.kwargs else self.args

    def tensors(self) -> list[Tensor]:
        return [t for t in pytree.tree_leaves(self.tree) if isinstance(t, Tensor)]

    def map(self, fn: Callable[[Any], Any]) -> "Call":
        """The same call with ``fn`` applied to every leaf (tensors and other values)."""
        return Call(tuple(pytree.tree_map(fn, list(self.args))),
                    {k: pytree.tree_map(fn, v) for k, v in self.kwargs.items()})
