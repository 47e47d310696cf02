"""Models that lmdfx decomposes."""

from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig, lifting_grids, load_checkpoint

__all__ = ["SimpleBEV", "SimpleBEVConfig", "lifting_grids", "load_checkpoint"]
