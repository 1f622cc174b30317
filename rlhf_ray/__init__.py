"""rlhf-ray: actor-based RLHF (PPO with LoRA) on Ray, with vLLM rollout generators."""
__version__ = "0.1.0"
