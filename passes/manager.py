"""A small pass manager: each pass states what it requires and ensures, returns ``(graph_module, modified)``,
and the graph is linted after every pass so a broken graph names the pass that broke it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from sparsecc.errors import PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class Pass(Protocol):
    name: str

    def requires(self, gm: fx.GraphModule) -> None: ...

    def call(self, gm: fx.GraphModule) -> PassResult: ...

    def ensures(self, gm: fx.GraphModule) -> None: ...


@dataclass
class PassManager:
    passes: list[Pass]
    rewrites: Counter = field(default_factory=Counter)

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        for p in self.passes:
            try:
                p.requires(gm)
                result = p.call(gm)
                gm = result.graph_module
                gm.graph.lint()
                if result.modified:
                    gm.recompile()
                p.ensures(gm)
            except PassError:
                raise
            except Exception as exc:
                raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
            self.rewrites.update(getattr(p, "counts", {}))
        return gm
