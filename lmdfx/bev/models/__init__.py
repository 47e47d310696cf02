"""Models that lmdfx decomposes."""

from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig, latest_checkpoint, lifting_grids, load_checkpoint

__all__ = ["SimpleBEV", "SimpleBEVConfig", "lifting_grids", "load_checkpoint", "latest_checkpoint"]
