"""Memory planner: exact parameter counts from a model's config.json (meta device, no
weights), per-actor bytes, vLLM's KV-cache capacity, and the placement of actors onto GPUs."""
from .shapes import ModelShape, model_shape

__all__ = ["ModelShape", "model_shape"]
