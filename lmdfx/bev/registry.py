"""What the ``lmdfx`` command knows by name: models (:data:`MODELS`) and datasets (:data:`DATASETS`).

A model is a registered name or ``module:factory`` (see :func:`build_model`); whatever builds it
returns an ``nn.Module`` that satisfies :class:`DecomposableModel`. A dataset entry builds, for
one model, a map-style dataset whose items are dicts holding that model's forward arguments
(plus ground truth such as ``vehicle_gt`` where the dataset has it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import nn

from lmdfx.bev.evaluation import HEAD
from lmdfx.errors import LMDError

__all__ = ["DecomposableModel", "ModelEntry", "MODELS", "build_model", "DataRequest", "DatasetEntry", "DATASETS",
           "ExampleInputs"]


class DecomposableModel(Protocol):
    """What a model entry's module provides besides being an ``nn.Module``.

    A ``module:factory`` may instead return ``(module, modality_args)``; ``example_inputs`` is
    needed only by ``inspect --run`` and the ``examples`` dataset.
    """

    #: modality name -> the forward parameter that carries it (the order of the components)
    modality_args: Mapping[str, str]

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Forward keyword arguments of one random sample, with a batch dimension of 1."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model."""

    description: str
    factory: Callable[[], nn.Module]  # the model with built-in weights (random ones are seeded)
    load_weights: Optional[Callable[[str], nn.Module]] = None  # the model from an lmdfx weights file
    head: Any = None  # output head measured by default (None: the whole output)


def _simplebev(preset: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig

        with torch.random.fork_rng(devices=[]):  # reproducible random weights, the caller's RNG untouched
            torch.manual_seed(0)
            return SimpleBEV(getattr(SimpleBEVConfig, preset)(**kwargs))

    return build


def _trained_world_model(path: Optional[str] = None) -> nn.Module:
    from lmdfx.bev.weights import load_world_model

    return load_world_model(path)


def _world_variant(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from lmdfx.bev.weights import WORLD_VARIANTS, load_world_model

        return load_world_model(WORLD_VARIANTS[name])

    return build


#: name -> entry. Every module has ``modality_args`` and ``example_inputs()``.
MODELS: dict[str, ModelEntry] = {
    "simplebev-world": ModelEntry("SimpleBEV trained on the synthetic sensor world (shipped weights, or --weights "
                                  "from python -m lmdfx.bev.train_world; camera + radar)", _trained_world_model,
                                  _trained_world_model, HEAD),
    "simplebev-world-nodropout": ModelEntry("the sensor-world SimpleBEV trained without sensor dropout (shipped "
                                            "weights; for lmdfx study)", _world_variant("nodropout"),
                                            _trained_world_model, HEAD),
    "simplebev-world-radarheavy": ModelEntry("the sensor-world SimpleBEV trained with camera dropout only and more "
                                             "radar-only vehicles (shipped weights; for lmdfx study)",
                                             _world_variant("radarheavy"), _trained_world_model, HEAD),
    "simplebev-tiny": ModelEntry("SimpleBEVConfig.tiny(): 32x64 images, 32x4x32 grid, ResNet-18, camera + radar; "
                                 "random weights (seed 0)", _simplebev("tiny"), head=HEAD),
    "simplebev-tiny-lidar": ModelEntry("SimpleBEVConfig.tiny(('camera', 'radar', 'lidar')): three modalities; "
                                       "random weights",
                                       _simplebev("tiny", modalities=("camera", "radar", "lidar")), head=HEAD),
    "simplebev-released-radar": ModelEntry("SimpleBEVConfig.released_radar(): ResNet-101, 448x800, 200x8x200, "
                                           "camera + metaradar (pass --checkpoint for the released weights)",
                                           _simplebev("released_radar"), head=HEAD),
    "simplebev-released-camera": ModelEntry("SimpleBEVConfig.released_camera(): the camera-only released model",
                                            _simplebev("released_camera"), head=HEAD),
    "simplebev-lmd-paper": ModelEntry("SimpleBEVConfig.lmd_paper(): the LMD paper's 224x400 camera + radar setting",
                                      _simplebev("lmd_paper"), head=HEAD),
}


def _import_module(name: str) -> Any:
    """Module ``name`` (dotted, found from the current folder first) or a ``.py`` file path."""
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)
        return module
    cwd = os.getcwd()
    # the console script's sys.path lacks the current folder that `python -m` would add
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def _call_factory(spec: str) -> Any:
    module_name, _, attr = spec.rpartition(":")  # rpartition: a Windows drive letter stays in the path
    try:
        module = _import_module(module_name)
    except Exception as exc:  # any failure inside the user's module: say which module, keep the cause
        raise LMDError(f"cannot import module {module_name!r} of model {spec!r}: {type(exc).__name__}: {exc}") \
            from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LMDError(f"module {module_name!r} has no callable {attr!r}; module:factory must name a function "
                       "(or class) returning the model.")
    try:
        return factory()
    except Exception as exc:
        raise LMDError(f"model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc


def build_model(spec: str, weights: Optional[str] = None) -> tuple[nn.Module, dict[str, str], Any]:
    """(model in eval mode, modality_args, default head) for a registered name or ``module:factory``.

    ``module`` is a dotted module name (the current folder is searched first) or a ``.py`` file;
    the factory is called without arguments and returns a module with ``modality_args`` or a
    pair ``(module, {modality: forward parameter})``. ``weights``: an lmdfx weights file, for
    entries that load one.
    """
    if spec in MODELS:
        entry = MODELS[spec]
        if weights is not None and entry.load_weights is None:
            with_weights = [name for name, e in MODELS.items() if e.load_weights is not None]
            raise LMDError(f"model {spec} loads no lmdfx weights file; --weights works with {', '.join(with_weights)} "
                           "(use --checkpoint for a state dict).")
        made, head = entry.factory() if weights is None else entry.load_weights(weights), entry.head
    elif ":" in spec:
        if weights is not None:
            raise LMDError(f"--weights needs a registered model ({', '.join(MODELS)}); use --checkpoint with "
                           f"{spec}.")
        made, head = _call_factory(spec), None
    else:
        raise LMDError(f"unknown model {spec!r}; use one of {', '.join(MODELS)} or module:factory "
                       "(a function returning the model).")
    modalities = None
    if isinstance(made, tuple) and len(made) == 2:
        made, modalities = made
    if not isinstance(made, nn.Module):
        raise LMDError(f"{spec} returned {type(made).__name__}; it must return an nn.Module (with .modality_args) "
                       "or (module, {modality: forward parameter}).")
    modalities = dict(modalities or getattr(made, "modality_args", None) or {})
    if not modalities:
        raise LMDError(f"{spec} returned a module without modality_args; return (module, {{modality: forward "
                       "parameter}}) instead.")
    return made.eval(), modalities, head


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------
@dataclass
class DataRequest:
    """What the command line asks of a dataset (each builder uses the fields it needs)."""

    root: Optional[str] = None  # dataroot (nuScenes)
    version: str = "v1.0-trainval"
    split: str = "val"
    limit: Optional[int] = None  # first N samples (generated datasets: N samples)
    seed: int = 2  # generated datasets


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: ``build(model, request)`` gives (dataset, one-line description)."""

    description: str
    build: Callable[[nn.Module, DataRequest], tuple[Any, str]]
    ground_truth: bool = False  # items hold vehicle_gt (and valid_mask), so component IoU is measured


def _bev_config(model: nn.Module, default: Callable[[], Any]) -> Any:
    """The SimpleBEV config to render inputs for: the model's own, else ``default()``."""
    from lmdfx.bev.models.simplebev import SimpleBEVConfig

    config = getattr(model, "config", None)
    return config if isinstance(config, SimpleBEVConfig) else default()


def _world(model: nn.Module, request: DataRequest) -> tuple[Any, str]:
    from lmdfx.bev.data.sensor_world import SensorWorld, world_config

    n = request.limit or 32
    world = SensorWorld(num_scenes=n, seed=request.seed, config=_bev_config(model, world_config))
    return world, f"sensor world, seed {request.seed}, {n} scenes"


def _nuscenes(model: nn.Module, request: DataRequest) -> tuple[Any, str]:
    from lmdfx.bev.data.nuscenes import SPLITS
    from lmdfx.bev.models.simplebev import SimpleBEVConfig

    if request.root is None or not os.path.isdir(request.root):
        raise LMDError(f"nuScenes dataroot {request.root!r} does not exist; pass the folder holding samples/, "
                       "sweeps/, maps/ and v1.0-*/ as --nuscenes.")
    if request.version not in SPLITS:
        raise LMDError(f"unknown nuScenes version {request.version!r}; use one of {', '.join(sorted(SPLITS))}.")
    if request.split not in SPLITS[request.version]:
        raise LMDError(f"split {request.split!r} does not belong to {request.version}; use one of "
                       f"{', '.join(SPLITS[request.version])}.")
    from lmdfx.bev.data.nuscenes import NuScenesBEVDataset

    data = NuScenesBEVDataset(request.root, request.version, request.split, _bev_config(model, SimpleBEVConfig))
    desc = f"nuScenes {request.version} {request.split} at {request.root}"
    if request.limit:
        data = torch.utils.data.Subset(data, range(min(request.limit, len(data))))
        desc += f", first {len(data)} samples"
    return data, desc


class ExampleInputs(torch.utils.data.Dataset):
    """``n`` samples of ``model.example_inputs()``; sample k is drawn under torch seed (seed, k)."""

    def __init__(self, model: nn.Module, n: int, seed: int = 0):
        if not callable(getattr(model, "example_inputs", None)):
            raise LMDError(f"{type(model).__name__} has no example_inputs(); the examples dataset draws its samples "
                           "from it. Add the method or pick another dataset.")
        self.model, self.n, self.seed = model, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        # regenerated on every access (partners revisit samples), so it must be deterministic
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            return dict(self.model.example_inputs())


def _examples(model: nn.Module, request: DataRequest) -> tuple[Any, str]:
    n = request.limit or 8
    return ExampleInputs(model, n, request.seed), f"{n} samples of example_inputs(), seed {request.seed}"


#: name -> entry.
DATASETS: dict[str, DatasetEntry] = {
    "world": DatasetEntry("synthetic sensor-world scenes (SimpleBEV camera + radar inputs, vehicle ground truth; "
                          "--seed, --limit scenes, default 32)", _world, ground_truth=True),
    "nuscenes": DatasetEntry("nuScenes keyframes as SimpleBEV inputs with vehicle ground truth (--dataroot, "
                             "--version, --split, --limit)", _nuscenes, ground_truth=True),
    "examples": DatasetEntry("random samples of the model's example_inputs() (any model; no ground truth; "
                             "--seed, --limit samples, default 8)", _examples),
}
