"""Sparsity patterns: one module per pattern (`fanin`, `nm`, `channels`), registered in one ordered table.

The records, the table and its lookups are in `base` and re-exported here; importing this package registers
the built-in patterns, most specific first (an exact 2:4 mask is also constant fan-in, and so are whole-channel
masks). See `base` for what a pattern holds and docs/architecture.md for adding one.
"""

from sparsecc.core.patterns import channels, fanin, nm
from sparsecc.core.patterns.base import (PATTERNS, NotCondensable, Op, OpTable, Pattern, Source, changed, of, op, ops,
                                         register, registered, unregister)

__all__ = ["PATTERNS", "NotCondensable", "Op", "OpTable", "Pattern", "Source", "changed", "of", "op", "ops",
           "register", "registered", "unregister"]

for _pattern in (nm.PATTERN, channels.PATTERN, fanin.PATTERN):
    register(_pattern)
