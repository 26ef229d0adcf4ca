"""Measurements of one training step: time, memory, activations, FLOPs, environment."""
