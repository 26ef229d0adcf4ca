"""Attention implementations for the video DiT."""
