"""Datasets: nuScenes loading for SimpleBEV, a tiny nuScenes writer, the synthetic sensor world.

Submodules import the nuscenes-devkit lazily, so ``import lmdfx.bev.data`` works without it.
"""

__all__ = ["NuScenesBEVDataset", "write_tiny_nuscenes"]


def __getattr__(name: str):
    # keep the devkit optional: import the nuScenes modules only when asked for
    if name == "NuScenesBEVDataset":
        from lmdfx.bev.data.nuscenes import NuScenesBEVDataset

        return NuScenesBEVDataset
    if name == "write_tiny_nuscenes":
        from lmdfx.bev.data.nuscenes_synthetic import write_tiny_nuscenes

        return write_tiny_nuscenes
    raise AttributeError(name)
