"""Example inputs as one call of the model: positional and keyword arguments. Hugging Face models are called
with keywords (``input_ids=..., attention_mask=...``); everything that runs the model on example inputs (narrowing,
capture, tuning, validation) runs it through a `Call`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import Tensor
from torch.utils import _pytree as pytree

from sparsecc.core.errors import InputError


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


def example_call(example_inputs: Any = None, example_kwargs: Optional[Mapping[str, Any]] = None, *,
                 needed_by: Optional[str] = None) -> Call:
    """The one normaliser of what users pass as example inputs, used by every public function (compile, inspect,
    validate, the exporters, save): positional inputs (a tensor, a tuple or list, a `Call`, None) and keyword
    inputs (a mapping) as one `Call`. ``needed_by`` names an operation that cannot run without a tensor input
    (an export): then a call without one is an `InputError` saying so."""
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise InputError(f"example_kwargs is a {type(example_kwargs).__name__}; pass a dict of keyword inputs")
    call = Call.of(example_inputs, example_kwargs)
    if needed_by is not None and not call.tensors():
        raise InputError(f"{needed_by} needs example inputs: a tensor or a tuple of tensors (batch first), or "
                         f"example_kwargs such as {{'input_ids': ids}}")
    return call


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class Arrangement:
    """Where each input of the example call sat, to lay later calls out the same way.

    An exported file or program takes its inputs as the example call passed them (this position, that keyword),
    while a user calls the loaded file as they call the model: ``model(ids, attention_mask=m)`` or all by
    keyword, in any order. The arrangement binds a call to ``forward``'s parameters and returns it as the
    example was arranged, or raises `InputError` naming the input that is missing or not taken. Plain data
    (names and kinds), so it travels in a file's metadata."""

    parameters: tuple[tuple[str, int], ...]   # forward's (name, inspect.Parameter kind), in order
    positional: tuple[str, ...]               # the example's positional inputs, as parameter keys
    keywords: tuple[str, ...]                 # the example's keyword inputs, in its order

    @classmethod
    def of(cls, forward: Callable[..., Any], example: "Call") -> "Arrangement":
        try:
            params = tuple((p.name, int(p.kind)) for p in inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):       # no signature (a builtin): positions and keywords as given
            params = (("args", int(inspect.Parameter.VAR_POSITIONAL)), ("kwargs", int(inspect.Parameter.VAR_KEYWORD)))
        blank = cls(params, (), ())
        keys = list(blank.keys(example.args, example.kwargs))
        return cls(params, tuple(keys[:len(example.args)]), tuple(keys[len(example.args):]))

    def to_json(self) -> dict:
        return {"parameters": [list(p) for p in self.parameters], "positional": list(self.positional),
                "keywords": list(self.keywords)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Arrangement":
        return cls(tuple((str(n), int(k)) for n, k in data["parameters"]), tuple(data["positional"]),
                   tuple(data["keywords"]))

    @property
    def names(self) -> list[str]:
        """The inputs the example gave, as a user names them."""
        return [k if not k.startswith("*") else f"positional input {k[1:]}" for k in self.positional + self.keywords]

    def keys(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's inputs keyed by the parameter each binds to (extra positions ``*i``, extra keywords by
        their name where forward takes ``**kwargs``)."""
        kinds = dict(self.parameters)
        positional = [n for n, k in self.parameters if k in _POSITIONAL]
        var_positional = inspect.Parameter.VAR_POSITIONAL in kinds.values()
        var_keyword = inspect.Parameter.VAR_KEYWORD in kinds.values()
        out: dict[str, Any] = {}
        for i, value in enumerate(args):
            if i < len(positional):
                out[positional[i]] = value
            elif var_positional:
                out[f"*{i - len(positional)}"] = value
            else:
                raise InputError(f"called with {len(args)} positional input(s); the model takes at most "
                                 f"{len(positional)} ({', '.join(positional)}): pass the others by keyword")
        for name, value in kwargs.items():
            if name in out:
                raise InputError(f"input {name!r} given twice: by position and by keyword")
            if kinds.get(name) not in _KEYWORD and not (var_keyword and name not in kinds):
                taken = [n for n, k in self.parameters if k in _KEYWORD]
                raise InputError(f"the model takes no input named {name!r}; it takes {', '.join(taken)}")
            out[name] = value
        return out

    def arrange(self, args: tuple, kwargs: Mapping[str, Any]) -> "Call":
        """``(args, kwargs)`` laid out like the example call; `InputError` for a missing or an extra input (an
        extra ``None`` is dropped: it is the default the example ran with)."""
        got = {k: v for k, v in self.keys(args, kwargs).items()
               if v is not None or k in self.positional or k in self.keywords}
        wanted = self.positional + self.keywords
        missing = [k for k in wanted if k not in got]
        extra = [k for k in got if k not in wanted]
        problems = []
        if missing:
            problems.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"input(s) {', '.join(map(repr, extra))} were not in the example call")
        if problems:
            raise InputError(f"{'; '.join(problems)}: this was compiled / exported for a call with "
                             f"{', '.join(self.names)} (to take other inputs, compile or export again with them in "
                             f"example_inputs / example_kwargs)")
        return Call(tuple(got[k] for k in self.positional), {k: got[k] for k in self.keywords})
