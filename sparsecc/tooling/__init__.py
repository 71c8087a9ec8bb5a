"""Tools around the compiler, built only on its public surface: the command line (`cli`), `make demo`
(`demo`), benchmarks and the peers they compare with (`bench`, `bench_hf`, `peers`), model loading for the
command line (`usermodel`, `hf`), synthetic models (`synthetic`) and the runtime smoke test (`smoke`).
Nothing in sparsecc imports them."""
