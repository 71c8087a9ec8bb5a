"""A small pass manager: each pass states what it requires and ensures, which passes must have run before it
(``after``), and returns a `PassResult` (the graph, whether it changed, what it applied). The manager refuses a
pass list out of order before running anything, lints the graph after every pass so a broken graph names the
pass that broke it, and keeps every pass's outcome as data (`PassManager.outcomes`); ``ran`` carries the names
of passes an earlier manager ran over the same graph, so order holds across stages."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from torch import fx

from sparsecc.core.errors import PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    applied: tuple[str, ...] = ()       # what the pass changed: condensed weights, folded BatchNorms, ...


@dataclass(frozen=True)
class PassOutcome:
    name: str
    modified: bool
    applied: tuple[str, ...]
    rewrites: dict[str, int]            # modules put in place, by op


class Pass(Protocol):
    name: str
    after: tuple[str, ...]           # passes that must have run before this one (in this manager or in ``ran``)

    def requires(self, gm: fx.GraphModule) -> None: ...

    def call(self, gm: fx.GraphModule) -> PassResult: ...

    def ensures(self, gm: fx.GraphModule) -> None: ...


@dataclass
class PassManager:
    passes: list[Pass]
    ran: Iterable[str] = ()
    rewrites: Counter = field(default_factory=Counter)
    outcomes: list[PassOutcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ran = tuple(self.ran)
        done = set(self.ran)
        for p in self.passes:
            missing = [a for a in p.after if a not in done]
            if missing:
                raise PassError(f"pass {p.name} must run after {', '.join(missing)}, which did not run before it "
                                f"(order: {', '.join([*self.ran, *(q.name for q in self.passes)])})")
            done.add(p.name)

    def names(self) -> tuple[str, ...]:
        """Every pass that has run over the graph: those before this manager, then its own."""
        return (*self.ran, *(o.name for o in self.outcomes))

    def applied(self) -> set[str]:
        return {a for o in self.outcomes for a in o.applied}

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
            counts = dict(getattr(p, "counts", {}))
            self.rewrites.update(counts)
            self.outcomes.append(PassOutcome(p.name, result.modified, tuple(result.applied), counts))
        return gm
