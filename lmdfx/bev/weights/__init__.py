"""Trained default weights: a small SimpleBEV for the synthetic sensor world.

The world model is a :func:`lmdfx.bev.data.sensor_world.world_config` SimpleBEV in which only the
layers matched by :func:`is_trained` were trained (camera ``depth_layer``, fusion, the BEV decoder
except the convolutions of ``decoder.layer3``, heads, all decoder BatchNorm affines). Everything
else keeps a fixed random initialisation that :func:`deterministic_init` regenerates bit for bit
from integer arithmetic, so the shipped file holds only the trained tensors (a few MB instead of
~40 MB); the frozen camera backbone acts as a random-feature extractor.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lmdfx.errors import LMDError

__all__ = ["WORLD_WEIGHTS", "WORLD_VARIANTS", "FORMAT", "is_trained", "deterministic_init", "save_world_weights",
           "load_world_model"]

#: The shipped weights of the sensor-world SimpleBEV.
WORLD_WEIGHTS = Path(__file__).with_name("simplebev_world.pt")
#: World models trained with another sensor balance (for ``lmdfx study``): name -> shipped file.
#: ``nodropout``: no sensor dropout; ``radarheavy``: camera dropout only and more radar-only vehicles.
WORLD_VARIANTS = {"nodropout": Path(__file__).with_name("simplebev_world_nodropout.pt"),
                  "radarheavy": Path(__file__).with_name("simplebev_world_radarheavy.pt")}
#: Format tag stored in the weights file.
FORMAT = "lmdfx-world-weights/1"

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def is_trained(name: str) -> bool:
    """Whether state-dict entry ``name`` of the world model is trained (and stored in the file)."""
    if name.startswith("encoder."):
        return name.startswith("encoder.depth_layer.")
    if name.startswith("decoder.layer3.") and ".conv" in name:
        return False
    if name.startswith("decoder.layer3.") and ".downsample.0." in name:
        return False
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # integer-only mixing: the same bits on every machine and numpy version
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _uniform(name: str, seed: int, n: int) -> np.ndarray:
    """n floats in [-1, 1) from (seed, name): a counter-based generator, platform independent."""
    key = np.uint64((zlib.crc32(name.encode()) << 20) ^ (seed & 0xFFFFF))
    with np.errstate(over="ignore"):
        counters = np.arange(n, dtype=np.uint64) + (key * np.uint64(0x100000001B3) & _MASK64)
    bits = _splitmix64(counters) >> np.uint64(11)  # 53 random bits
    return bits.astype(np.float64) * (2.0 / 2.0 ** 53) - 1.0


def deterministic_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-initialise every parameter and buffer of ``model`` reproducibly from ``seed``.

    Convolution and linear weights: Kaiming-uniform with fan-out (bound sqrt(6 / fan_out)),
    the torchvision ResNet scale; norm weights 1; biases, running means and scalars 0; running
    variances 1. Only integer arithmetic and one multiplication per value, so every platform gets
    the same bits.
    """
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("running_var"):
                tensor.fill_(1.0)
            elif name.endswith("num_batches_tracked") or name.endswith("running_mean") or tensor.dim() <= 1:
                is_norm_weight = name.endswith(".weight") and tensor.dim() == 1
                tensor.fill_(1.0 if is_norm_weight else 0.0)
            else:
                fan_out = tensor.shape[0] * int(np.prod(tensor.shape[2:])) if tensor.dim() > 2 else tensor.shape[0]
                bound = float(np.sqrt(6.0 / fan_out))
                values = _uniform(name, seed, tensor.numel()) * bound
                tensor.copy_(torch.from_numpy(values).reshape(tensor.shape).to(tensor.dtype))


def _world_model(config: Any, seed: int) -> torch.nn.Module:
    from lmdfx.bev.models.simplebev import SimpleBEV

    model = SimpleBEV(config)
    deterministic_init(model, seed)
    return model


def _fingerprint(model: torch.nn.Module) -> float:
    # a cheap check that the frozen tensors regenerated as they were at training time
    sd = model.state_dict()
    return float(sum(sd[k].double().sum() for k in sorted(sd) if not is_trained(k)))


def save_world_weights(model: torch.nn.Module, path: str | os.PathLike, init_seed: int,
                       meta: Optional[dict] = None, dtype: torch.dtype = torch.float32) -> None:
    """Write the trained tensors of a world model (plus config, init seed, metadata) to ``path``."""
    sd = model.state_dict()
    trained = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).clone()
               for k, v in sd.items() if is_trained(k)}
    torch.save({"format": FORMAT, "config": asdict(model.config), "init_seed": int(init_seed),
                "fingerprint": _fingerprint(model), "trained": trained, "meta": meta or {}}, os.fspath(path))


def _remedy(path: Path) -> str:
    """What to do about a damaged weights file."""
    if path.resolve() in {f.resolve() for f in (WORLD_WEIGHTS, *WORLD_VARIANTS.values())}:
        return "the shipped file is damaged: reinstall lmdfx"
    return f"write it again with `python -m lmdfx.bev.train_world --out {path}`"


#: Entries of a world-weights file and their types.
_ENTRIES = {"config": dict, "init_seed": int, "fingerprint": (int, float), "trained": dict, "meta": dict}


def _read_weights(path: Path) -> dict:
    """The checked contents of a world-weights file."""
    from lmdfx.bev.models.simplebev import read_torch_file

    if not path.is_file():
        raise LMDError(f"world weights {str(path)!r} not found; train them with "
                       f"`python -m lmdfx.bev.train_world --out {path}` (a few minutes on a CPU).")
    blob = read_torch_file(path, "world-weights file", _remedy(path))
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise LMDError(f"{str(path)!r} is not an lmdfx world-weights file (format {FORMAT}); "
                       "write one with `python -m lmdfx.bev.train_world`.")
    blob.setdefault("meta", {})  # older files carry no training record
    wrong = [f"{key!r} is {type(blob[key]).__name__ if key in blob else 'missing'}"
             for key, kind in _ENTRIES.items() if not isinstance(blob.get(key), kind)]
    if wrong:
        raise LMDError(f"world-weights file {str(path)!r} is malformed ({'; '.join(wrong)}, where the format wants "
                       f"config, trained and meta dicts, an integer init_seed and a number fingerprint); "
                       f"{_remedy(path)}.")
    return blob


def _config(path: Path, stored: dict) -> Any:
    from lmdfx.bev.models.simplebev import SimpleBEVConfig

    try:
        return SimpleBEVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    except (TypeError, ValueError, LMDError) as exc:
        raise LMDError(f"world-weights file {str(path)!r} holds a config that is not a SimpleBEVConfig ({exc}); "
                       f"{_remedy(path)}.") from exc


def load_world_model(path: str | os.PathLike | None = None) -> torch.nn.Module:
    """The sensor-world SimpleBEV with trained weights (the shipped file unless ``path``), in eval mode.

    A missing, unreadable or malformed file raises :class:`LMDError` naming it.
    """
    path = Path(path) if path is not None else WORLD_WEIGHTS
    blob = _read_weights(path)
    model = _world_model(_config(path, blob["config"]), blob["init_seed"])
    if abs(_fingerprint(model) - blob["fingerprint"]) > 1e-6 * max(1.0, abs(blob["fingerprint"])):
        raise LMDError(f"the frozen initialisation does not reproduce the one {str(path)!r} was trained "
                       "with (lmdfx.bev.weights.deterministic_init changed); retrain with "
                       "`python -m lmdfx.bev.train_world`.")
    trained = blob["trained"]
    own = model.state_dict()
    expected = sorted(k for k in own if is_trained(k))
    if set(trained) != set(expected):
        raise LMDError(f"{str(path)!r} holds {len(trained)} tensors whose names do not match the world model's "
                       f"{len(expected)} trained tensors; retrain with `python -m lmdfx.bev.train_world`.")
    misfit = [k for k in expected if not isinstance(trained[k], torch.Tensor) or trained[k].shape != own[k].shape]
    if misfit:
        shown = ", ".join(f"{k} ({type(trained[k]).__name__} {tuple(getattr(trained[k], 'shape', ()))}, model "
                          f"{tuple(own[k].shape)})" for k in misfit[:3])
        raise LMDError(f"world-weights file {str(path)!r} holds {len(misfit)} entries that are not tensors of the "
                       f"model's shapes: {shown}; {_remedy(path)}.")
    with torch.no_grad():
        for k, v in trained.items():
            own[k].copy_(v.to(own[k].dtype))
    model.world_meta = dict(blob["meta"])  # training record (steps, IoU) for reports
    return model.eval()
