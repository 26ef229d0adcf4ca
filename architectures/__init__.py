"""Video diffusion architectures measured by stbench. Knows nothing about measuring."""
from .base import LATENT_SCALE, TRAINING_MODES, VideoBatch, VideoModel
from .registry import Architecture, build, context_parallel_names, get, make_config, names, register

__all__ = ["LATENT_SCALE", "TRAINING_MODES", "VideoBatch", "VideoModel", "Architecture", "build", "get",
           "make_config", "names", "register", "context_parallel_names"]
