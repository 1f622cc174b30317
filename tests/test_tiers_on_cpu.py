"""The fast tier's guard (tests/tier_guard.py) fails a test not marked integration that starts
Ray or imports vLLM, in the test's process and in a Python subprocess it starts."""
import subprocess
import sys

import pytest

from rlhf_ray_tier_guard import TierError


def test_starting_ray_or_importing_vllm_fails_a_fast_test():
    import ray

    with pytest.raises(TierError, match="test_tiers_on_cpu.py::.* starts or joins Ray .* not marked integration"):
        ray.init()
    # In a subprocess (in this process vLLM may already be imported by an earlier integration test).
    for code, what in (("import ray; ray.init(num_cpus=1)", "starts or joins Ray"), ("import vllm", "imports vllm")):
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert child.returncode != 0 and what in child.stderr and "not marked integration" in child.stderr, child.stderr[-2000:]


@pytest.mark.integration
def test_an_integration_test_has_the_sessions_head(ray_head):
    import ray

    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_head.address
