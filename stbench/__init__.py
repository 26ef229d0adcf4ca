"""stbench: benchmarking and profiling for training text-to-video models."""
__version__ = "0.1.0"
