"""Datasets: the generated default task, prompt and preference-pair loaders."""
