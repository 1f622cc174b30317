"""Benchmarks run by `rlhf-ray bench <name>`; they ship with the repository, not the wheel."""
