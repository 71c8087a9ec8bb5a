"""The reference runtime: pure torch, runs everywhere; the correctness oracle (`runtime`)."""
