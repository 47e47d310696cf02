"""Camera + radar + LiDAR SimpleBEV: concat fusion of all three BEV inputs.

``SimpleBEVConfig`` already takes ``modalities=("camera", "radar", "lidar")``; this module only
names the presets, so a tri-modal model is one call::

    model = simplebev_trimodal("tiny").eval()
    dec = lmdfx.compile(model, model.modality_args)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmdfx.errors import LMDError
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig

__all__ = ["TRIMODAL", "simplebev_trimodal", "trimodal_config"]

#: The component order of a tri-modal decomposition.
TRIMODAL = ("camera", "radar", "lidar")
_PRESETS = ("tiny", "paper", "full")


def trimodal_config(preset: str = "tiny", **overrides: Any) -> SimpleBEVConfig:
    """A ``SimpleBEVConfig`` with camera, radar and LiDAR.

    ``preset``: ``"tiny"`` (CPU tests: ResNet-18, 32x64 images, 32x4x32 grid), ``"paper"``
    (the LMD paper's 224x400 input), ``"full"`` (the released 448x800 setting). ``overrides``
    replace config fields (e.g. ``num_cameras=2``, ``radar_mode="occupancy"``).
    """
    if preset == "tiny":
        config = SimpleBEVConfig.tiny(modalities=TRIMODAL)
    elif preset == "paper":
        config = SimpleBEVConfig.lmd_paper(modalities=TRIMODAL)
    elif preset == "full":
        config = SimpleBEVConfig(modalities=TRIMODAL)
    else:
        raise LMDError(f"Unknown tri-modal SimpleBEV preset {preset!r}; use one of {', '.join(_PRESETS)}.")
    if "modalities" in overrides:
        raise LMDError("trimodal_config fixes modalities to camera, radar, lidar; for others use "
                       "SimpleBEVConfig.tiny(modalities=...).")
    return replace(config, **overrides) if overrides else config


def simplebev_trimodal(preset: str = "tiny", **overrides: Any) -> SimpleBEV:
    """A camera + radar + LiDAR ``SimpleBEV`` (see ``trimodal_config``); call ``.eval()`` before compiling."""
    return SimpleBEV(trimodal_config(preset, **overrides))
