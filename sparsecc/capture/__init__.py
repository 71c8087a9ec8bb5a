"""Stage 1, capture: the user's model as sparsecc reads it — its masks from every source (`masks`), a graph
(torch.fx, or torch.export's graph read back into modules: `graph`, `modularize`). No rewriting happens here."""
