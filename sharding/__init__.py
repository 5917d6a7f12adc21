"""Meshes, partition rules and the pipeline schedule (imports only jax)."""
