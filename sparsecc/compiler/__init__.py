"""The compiler: the pipeline of stages (`pipeline`) from a captured model to a `CompiledModel` (`compiled`),
with validation against the user's model (`validation`), the bf16 precision stage (`precision`) and the
per-layer sparse-vs-dense measurement (`autotune`). It picks runtimes and engines by name through
`sparsecc.core.registry` and calls their writers; the public functions (`sparsecc.api`, `sparsecc.exports`)
sit above it."""
