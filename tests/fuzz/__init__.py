"""A differential fuzzer over every sparsecc backend (after NNSmith, ASPLOS'23): `generate` builds seeded
random valid masked models, `run` compiles each on the backends and compares with the user's model as the
user calls it. ``python -m tests.fuzz --cases N`` (``make fuzz``) prints per backend: cases, passes, refusals
(with reasons) and failures."""
