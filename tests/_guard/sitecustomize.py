"""Loaded by Python at start-up in a subprocess of a fast-tier test (this folder is put first
on PYTHONPATH for it): the same guard as in the test process."""
import os

if os.environ.get("RLHF_RAY_FAST_TEST"):
    import rlhf_ray_tier_guard

    rlhf_ray_tier_guard.install(os.environ["RLHF_RAY_FAST_TEST"])
