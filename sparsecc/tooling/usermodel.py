"""The models the command line takes: a Hugging Face model directory (inputs from its tokenizer or config), a
``torch.export`` ``.pt2`` (inputs from the program's example inputs), or a ``torch.save``d ``nn.Module`` (inputs
from its first layer, or ``--input-shape``); ``--sparsify fanin:0.9 | 2:4`` tries a pattern on a dense one.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sparsecc.capture.masks import transposed_weights, weight_slots
from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Call
from sparsecc.tooling import hf

#: Output layers ``--sparsify`` leaves dense, as the sparse-training recipes do (LM heads, classifiers).
HEADS = re.compile(r"(^|\.)(lm_head|head|heads\.head|classifier|fc|pooler\.dense|score)$")


@dataclass
class Loaded:
    model: nn.Module
    call: Call
    what: str                   # where it came from, for the progress lines


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's float inputs are made in: its first floating-point weight's (a bf16 or fp16 model
    takes inputs of its own dtype, as the user calls it), float32 for a model with none."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _first_layer_call(model: nn.Module, tokens: int) -> Call:
    """A batch-1 input for a model whose first layer says what it reads: token ids for an embedding, an image
    for a convolution, features for a Linear (in the layer's own dtype)."""
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return Call((torch.randint(0, mod.num_embeddings, (1, tokens)),))
        if isinstance(mod, nn.Conv2d):
            return Call((torch.randn(1, mod.in_channels, 224, 224, dtype=mod.weight.dtype),))
        if isinstance(mod, nn.Linear):
            return Call((torch.randn(1, mod.in_features, dtype=mod.weight.dtype),))
    raise InputError("cannot tell this model's input from its layers: pass --input-shape (e.g. 1,3,224,224)")


def _pt2(path: Path) -> tuple[nn.Module, Optional[Call]]:
    from sparsecc.capture.modularize import modularize

    program = torch.export.load(path)
    module = program.module()
    modularize(module)
    for m in module.modules():        # the graph was recorded in the mode it was exported in; eval() is refused
        m.training = False
    example = program.example_inputs
    return module, (Call(tuple(example[0]), dict(example[1])) if example is not None else None)


def load(spec: str, input_shape: Optional[Sequence[int]] = None, tokens: int = 32) -> Loaded:
    """The model at ``spec`` and one call of it."""
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{spec}: no such file or directory; give a Hugging Face model directory, a .pt2 file or "
                         f"a torch.save'd nn.Module (or --model NAME for a built-in demo)")
    call: Optional[Call] = None
    if hf.is_model_dir(path):
        model, call = hf.load(path, tokens)
        what = f"{type(model).__name__} from {path}"
    elif path.suffix == ".pt2":
        model, call = _pt2(path)
        what = f"torch.export program {path.name}"
    else:
        model = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(model, nn.Module):
            raise InputError(f"{path} holds a {type(model).__name__}, not an nn.Module: save the module itself "
                             f"(torch.save(model, path)), not its state_dict")
        model.eval()
        what = f"{type(model).__name__} from {path.name}"
    if input_shape:
        call = Call((torch.randn(*input_shape, dtype=float_dtype(model)),))
    return Loaded(model, call or _first_layer_call(model, tokens), what)


def parse_sparsify(text: str) -> tuple[str, float]:
    """``fanin:0.9`` -> ("fanin", 0.9); ``2:4`` -> ("2:4", 0.5)."""
    if text == "2:4":
        return "2:4", 0.5
    match = re.fullmatch(r"fanin:(0?\.\d+)", text)
    if not match:
        raise InputError(f"--sparsify {text!r}: use fanin:SPARSITY (e.g. fanin:0.9) or 2:4")
    return "fanin", float(match.group(1))


def sparsify(model: nn.Module, text: str) -> int:
    """Attach magnitude masks of the ``--sparsify`` pattern to every Linear/Conv2d except the output layers
    (and, for 2:4, layers whose input is not a multiple of 4); returns how many layers got one."""
    from sparsecc.sparsify import sparsify as attach

    structure, sparsity = parse_sparsify(text)
    transposed = transposed_weights(model)
    chosen = set()
    for module, attr, _, _ in weight_slots(model):
        fqn = f"{module}.{attr}" if module else attr
        weight = getattr(model.get_submodule(module), attr)
        inputs = weight.shape[0] if fqn in transposed else weight[0].numel()
        if attr == "weight" and not HEADS.search(module) and (structure != "2:4" or inputs % 4 == 0):
            chosen.add(fqn)
    if not chosen:
        raise InputError(f"--sparsify {text}: no Linear/Conv2d layer to sparsify in this model")
    report = attach(model, structure, sparsity=sparsity, include=lambda fqn, kind: fqn in chosen)
    return len(report.layers)


class Progress(logging.Handler):
    """Progress lines on stderr: the CLI's own steps and each compile stage as it finishes."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.start = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"[{time.perf_counter() - self.start:6.1f} s] {record.getMessage()}\n")
        sys.stderr.flush()


def progress() -> logging.Logger:
    """The logger the CLI and the compile pipeline report steps to, shown on stderr."""
    logger = logging.getLogger("sparsecc.progress")
    if not any(isinstance(h, Progress) for h in logger.handlers):
        logger.addHandler(Progress())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def positional(model: nn.Module, call: Call) -> tuple[Any, ...]:
    """The call's inputs in forward()'s order, for the exporters (which take positional tensors)."""
    import inspect

    bound = inspect.signature(model.forward).bind(*call.args, **call.kwargs)
    if bound.kwargs:
        raise InputError(f"the exporters take positional inputs; {sorted(bound.kwargs)} are keyword-only here")
    return tuple(bound.args)
