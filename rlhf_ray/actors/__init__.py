"""One module per role. Each role is a plain class; ``ray.remote`` is applied at launch."""
