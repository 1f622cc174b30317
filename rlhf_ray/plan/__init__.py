"""Memory planner: exact parameter counts from a model's config.json (meta device, no
weights), per-actor bytes, vLLM's KV-cache capacity, the placement of actors onto GPUs, and a
rate model of the PPO step that ranks generator/learner splits (``rates``)."""
from .shapes import ModelShape, model_shape

__all__ = ["ModelShape", "model_shape"]
