"""Stage 2, planning: what each weight's mask is (`analysis`: its structure, or why it is unstructured), what
replaces each layer or why it stays (`condense`: one `Decision` per layer), and which ablated or unused channels
leave the network (`narrow`, on a copy of the captured model). Decisions only; the graph passes (`passes/`)
carry them out."""
