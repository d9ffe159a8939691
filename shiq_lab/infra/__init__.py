"""Plumbing: the model registry, offline assets, runtime settings, notebook running, the main job."""
