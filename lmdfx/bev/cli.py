"""The ``lmdfx`` command: ``demo``, ``study``, ``inspect`` and ``evaluate``.

Models come from :data:`lmdfx.bev.registry.MODELS` or a ``module:factory``, datasets from
:data:`lmdfx.bev.registry.DATASETS`. Bad arguments and failing models end with one line on
stderr (``lmdfx COMMAND: error: ...``) and exit status 2; ``--debug`` shows the traceback instead.
Arguments are checked before any model is built. Ctrl-C ends a command with one line
(``lmdfx COMMAND: interrupted``) and exit status 130. Output files are written atomically
(:mod:`lmdfx.bev.files`): an interrupted run leaves no truncated file. ``evaluate`` runs distributed
under ``torchrun`` (samples sharded over the ranks, sums all-reduced, rank 0 writes the outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

import lmdfx
from lmdfx.bev.evaluation import evaluate
from lmdfx.bev.files import check_out_folder, write_text
from lmdfx.bev.registry import DATASETS, MODELS, DataRequest, build_model
from lmdfx.errors import LMDError
from lmdfx.metrics import dataset_size

__all__ = ["main"]


# ---------------------------------------------------------------------------
# --checkpoint: a state dict for any model
# ---------------------------------------------------------------------------
def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load ``path`` (a file, or a SimpleBEV ``init_dir`` folder: its latest ``model-*.pth``) strictly."""
    from lmdfx.bev.models.simplebev import SimpleBEV, latest_checkpoint, load_checkpoint, read_torch_file

    path = latest_checkpoint(path) if os.path.isdir(path) else path
    if isinstance(model, SimpleBEV):
        load_checkpoint(model, path)  # strict, names missing/unexpected keys and the preset to use
        return
    if not os.path.isfile(path):
        raise LMDError(f"checkpoint file {path!r} does not exist; fix --checkpoint.")
    blob = read_torch_file(path, "checkpoint", "pass a file written by torch.save(model.state_dict())")
    state = blob.get("model_state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise LMDError(f"checkpoint {path!r} holds {type(blob).__name__}, not a state dict.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        summary = " ".join(s.strip() for s in first[:3])
        raise LMDError(f"checkpoint {path!r} does not fit the model: {summary}") from None


# ---------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, "a positive integer (1 or more)")


def _non_negative(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _scenes(text: str) -> int:
    return _integer(text, 2, "an integer of 2 or more (the separation protocol pairs each scene with another)")


class _NuScenes(argparse.Action):
    """``--nuscenes DATAROOT``: shorthand for ``--data nuscenes --dataroot DATAROOT``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        namespace.data, namespace.dataroot = "nuscenes", values


def _common() -> argparse.ArgumentParser:
    """Options of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive, default=1,
                        help="torch intra-op threads (default 1: more threads than free cores make torch crawl)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return common


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[common],
                          help="decompose the default model on sensor-world scenes; write figures and a report",
                          description="Decompose the sensor-world SimpleBEV on unseen scenes and write PNG figures "
                                      "plus report.md / report.json (needs matplotlib: pip install \"lmdfx[viz]\").")
    demo.add_argument("--out", default="lmdfx-demo", help="output folder (default: ./lmdfx-demo)")
    demo.add_argument("--scenes", type=_scenes, default=12, help="sensor-world scenes to evaluate (default 12)")
    demo.add_argument("--weights", help="world weights from python -m lmdfx.bev.train_world --out PATH "
                                        "(default: the shipped file)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)


def _models(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_study(sub: Any, common: argparse.ArgumentParser) -> None:
    from lmdfx.bev.study import DEFAULT_SCENES, GRIDS, QUICK_SCENES, STUDY_MODELS

    study = sub.add_parser("study", parents=[common],
                           help="rule ablation on the sensor world: separation, ground-truth attribution, IoU, cost",
                           description="For every rule set of a grid and every sensor-world model: separation "
                                       "(Table 4), ground-truth attribution score with bootstrap intervals, "
                                       "per-component IoU, cost and exactness, beside Shapley, occlusion and "
                                       "Captum baselines. Writes study.json, study.md and study.png (needs "
                                       "matplotlib).")
    study.add_argument("--out", default="lmdfx-study", help="output folder (default: ./lmdfx-study)")
    study.add_argument("--scenes", type=_scenes, help=f"unseen scenes (default {DEFAULT_SCENES}; "
                                                      f"{QUICK_SCENES} with --quick)")
    study.add_argument("--quick", action="store_true", help=f"a smoke run on {QUICK_SCENES} scenes (wide intervals)")
    study.add_argument("--models", type=_models, default=list(STUDY_MODELS),
                       help=f"comma-separated sensor-world models (default {','.join(STUDY_MODELS)})")
    study.add_argument("--grid", default="ofat", help=f"rule grid: {' or '.join(GRIDS)} (default ofat: one factor at "
                                                      "a time around the defaults; full: all 36 combinations)")
    study.add_argument("--jobs", type=_positive, default=3,
                       help="models studied at once, each in a process of one torch thread (default 3)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(func=_cmd_study)


def _add_inspect(sub: Any, common: argparse.ArgumentParser) -> None:
    ins = sub.add_parser("inspect", parents=[common], help="print the compile report of a model",
                         description="Compile MODEL and print every node: layer, provenance, rule.")
    ins.add_argument("model", help=f"registered name ({', '.join(MODELS)}) or module:factory (module: dotted name "
                                   "found from the current folder, or a .py file)")
    ins.add_argument("--run", action="store_true",
                     help="also run the decomposition once on model.example_inputs() to fill in the residuals")
    ins.set_defaults(func=_cmd_inspect)


def _add_evaluate(sub: Any, common: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("evaluate", parents=[common], help="separation table and per-component IoU on a dataset",
                        description="Perturbation protocol (appendix D.2) and, on datasets with vehicle ground "
                                    "truth, per-component vehicle IoU. Writes evaluation.json and evaluation.md to "
                                    "--out. Runs distributed under torchrun.")
    ev.add_argument("--model", required=True, help=f"registered name ({', '.join(MODELS)}) or module:factory")
    weights = ev.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="lmdfx weights file (simplebev-world: from python -m lmdfx.bev.train_world)")
    weights.add_argument("--checkpoint", help="state dict to load (SimpleBEV: a file with model_state_dict, or a "
                                              "folder whose last model-*.pth is used)")
    data = ev.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", choices=list(DATASETS),
                      help="; ".join(f"{name}: {entry.description}" for name, entry in DATASETS.items()))
    data.add_argument("--world", dest="data", action="store_const", const="world", help="same as --data world")
    data.add_argument("--nuscenes", metavar="DATAROOT", action=_NuScenes,
                      help="same as --data nuscenes --dataroot DATAROOT")
    ev.add_argument("--dataroot", help="dataset folder (nuScenes: holds samples/, sweeps/, v1.0-*/)")
    ev.add_argument("--version", default="v1.0-trainval", help="nuScenes version (default v1.0-trainval)")
    ev.add_argument("--split", default="val", help="nuScenes split (default val)")
    ev.add_argument("--limit", type=_positive, help="first N samples only (generated datasets: N samples)")
    ev.add_argument("--seed", type=_non_negative, default=2,
                    help="seed of generated datasets (default 2: the sensor-world scenes training did not see)")
    ev.add_argument("--shift", type=_positive, default=500, help="partner offset step (default 500)")
    ev.add_argument("--repeats", type=_positive, default=12, help="partners per sample (default 12)")
    ev.add_argument("--head", help="output head (dict key) to measure (default: segmentation for the registered "
                                   "models, the whole output for module:factory)")
    ev.add_argument("--no-iou", action="store_true", help="skip the per-component IoU even where there is ground truth")
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_cmd_evaluate)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmdfx", description="Layer-wise Modality Decomposition (LMD) for fusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _common()
    _add_demo(sub, common)
    _add_study(sub, common)
    _add_inspect(sub, common)
    _add_evaluate(sub, common)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lmdfx`` command; returns the exit status (130 after Ctrl-C)."""
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:
        print("lmdfx: interrupted", file=sys.stderr)
        return 130
    torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"lmdfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split())
        if isinstance(exc, (LMDError, OSError)):  # OSError: unreadable data, unwritable --out
            print(f"lmdfx {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(f"lmdfx {args.command}: error: {type(exc).__name__}: {message} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# Checks made before any model is built
# ---------------------------------------------------------------------------
def _check_model(spec: str, option: str) -> None:
    """``spec`` names a registered model or an importable ``module:factory`` (the factory is not called)."""
    if spec in MODELS:
        return
    if ":" not in spec:
        raise LMDError(f"unknown model {spec!r}; pass as {option} one of {', '.join(MODELS)} or module:factory "
                       "(a function returning the model, e.g. mymodels:build).")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise LMDError(f"{option} {spec!r} is not module:factory; write e.g. mymodels:build (module mymodels, "
                       "function build).")
    if module_name.endswith(".py"):
        # a file is executed once, when the model is built; here only its presence is checked
        if not os.path.isfile(module_name):
            raise LMDError(f"cannot import module {module_name!r} of model {spec!r}: no such file; fix {option}.")
        return
    from lmdfx.bev.registry import _import_module

    try:
        module = _import_module(module_name)
    except Exception as exc:  # any failure inside the user's module: say which module, keep the cause
        raise LMDError(f"cannot import module {module_name!r} of model {spec!r}: {type(exc).__name__}: {exc}") \
            from exc
    if not callable(getattr(module, attr, None)):
        raise LMDError(f"module {module_name!r} has no callable {attr!r}; module:factory must name a function "
                       f"(or class) returning the model. Fix {option}.")


def _check_file(option: str, path: Optional[str], what: str, folder: bool = False) -> None:
    """``path`` (when given) exists and is a file (or, with ``folder``, a file or a folder)."""
    if path is None:
        return
    if not os.path.exists(path):
        raise LMDError(f"{option} {path!r} not found; pass {what}.")
    if not folder and not os.path.isfile(path):
        raise LMDError(f"{option} {path!r} is not a file; pass {what}.")


def _check_partners(shift: int, repeats: int, n: int, command: str = "evaluate") -> None:
    """The partner offsets ``shift * r`` (r = 1..repeats) against ``n`` samples: an error when no
    sample gets a partner, a note on stderr when offsets wrap onto the sample itself or repeat."""
    if n < 2:
        raise LMDError(f"the dataset has {n} sample; the separation protocol pairs each sample with another one, "
                       "so it needs at least 2 (raise --limit).")
    residues = [(shift * r) % n for r in range(1, repeats + 1)]
    onto_itself = [r for r, x in enumerate(residues, 1) if x == 0]
    pairs = repeats - len(onto_itself)
    if pairs == 0:
        raise LMDError(f"--shift {shift} with --repeats {repeats} pairs each of the {n} samples with itself "
                       f"(partner p = (k + {shift}·r) mod {n} = k for every r), so nothing would be measured; use a "
                       f"--shift that is not a multiple of {n}, e.g. --shift 1.")
    distinct = len({x for x in residues if x})
    if onto_itself or distinct < pairs:
        parts = []
        if onto_itself:
            parts.append(f"for r = {', '.join(map(str, onto_itself))} the partner is the sample itself and is "
                         "skipped")
        if distinct < pairs:
            parts.append(f"the other {pairs} offsets reach only {distinct} distinct partner{'s' * (distinct > 1)} "
                         "(a repeated partner is measured again)")
        if os.environ.get("RANK", "0") == "0":
            print(f"lmdfx {command}: note: partner p = (k + {shift}·r) mod {n} wraps around the {n} samples: "
                  f"{'; '.join(parts)}. Each sample gets {pairs} pairs; a --shift with no common factor with {n} "
                  f"and --repeats below {n} gives distinct partners.", file=sys.stderr)


@contextmanager
def _model_errors(spec: str, doing: str) -> Iterator[None]:
    """An exception of a ``module:factory`` model (other than lmdfx's own errors) as a one-line LMDError."""
    if spec in MODELS:  # the registered models are lmdfx's own: their failures are bugs (exit 1)
        yield
        return
    try:
        yield
    except LMDError:
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise LMDError(f"model {spec!r} failed while {doing}: {type(exc).__name__}: {message} (the model's code, "
                       "its inputs or the decomposition of one of its operations; --debug shows the traceback)") \
            from exc


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from lmdfx.bev import demo  # the sensor world and figures: only the demo needs them

    # demo.run checks --out, --scenes and --weights (and matplotlib) before it builds the model
    demo.run(args.out, args.scenes, args.weights, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------
# study
# ---------------------------------------------------------------------------
def _cmd_study(args: argparse.Namespace) -> int:
    from lmdfx.bev import study  # figures and the sensor world: only the study needs them

    # study.run checks --out, --scenes, --models and --grid (and matplotlib) before it builds anything
    study.run(args.out, args.scenes, args.quick, args.models, args.grid, progress=not args.no_progress,
              jobs=args.jobs)
    return 0


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    _check_model(args.model, "MODEL")
    model, modalities, _ = build_model(args.model)
    with _model_errors(args.model, "being compiled"):
        dec = lmdfx.compile(model, modalities)
    if args.run:
        if not callable(getattr(model, "example_inputs", None)):
            raise LMDError(f"{args.model} has no example_inputs(); drop --run.")
        with _model_errors(args.model, "running on example_inputs()"), torch.no_grad():
            dec(**model.example_inputs())
    print(dec.report())
    return 0


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------
def _init_distributed(device_arg: Optional[str]) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when the environment has one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if world > 1:
        dist = torch.distributed
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank = dist.get_rank()
    else:
        rank = 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device


def _markdown(args: argparse.Namespace, desc: str, head: Any, processes: int, result: Any) -> str:
    """evaluation.md."""
    lines = [f"# lmdfx evaluate: {args.model}", "",
             f"- data: {desc}", f"- weights: {args.weights or args.checkpoint or 'built in'}",
             f"- protocol: partner p = (k + {args.shift}·r) mod N, r = 1..{args.repeats}; "
             f"head {'the whole output' if head is None else repr(head)}",
             f"- processes: {processes}", "", result.markdown()]
    return "\n".join(lines)


def _check_evaluate(args: argparse.Namespace) -> Path:
    """Every argument that can be checked without building the model; returns the --out folder."""
    if args.device not in (None, "cpu", "cuda"):
        raise LMDError(f"--device must be cpu or cuda, got {args.device!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LMDError("--device cuda but no CUDA device is available; use --device cpu.")
    out = check_out_folder(args.out)
    _check_file("--weights", args.weights, "a file written by python -m lmdfx.bev.train_world --out PATH")
    _check_file("--checkpoint", args.checkpoint, "a state-dict file or a folder of model-*.pth files", folder=True)
    if args.data == "nuscenes" and (args.dataroot is None or not os.path.isdir(args.dataroot)):
        raise LMDError(f"nuScenes dataroot {args.dataroot!r} does not exist; pass the folder holding samples/, "
                       "sweeps/, maps/ and v1.0-*/ as --nuscenes.")
    if args.limit is not None and args.data in ("world", "examples"):  # generated: exactly --limit samples
        _check_partners(args.shift, args.repeats, args.limit)
    _check_model(args.model, "--model")
    return out


def _cmd_evaluate(args: argparse.Namespace) -> int:
    start = time.time()
    out = _check_evaluate(args)
    model, modalities, default_head = build_model(args.model, args.weights)
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    request = DataRequest(args.dataroot, args.version, args.split, args.limit, args.seed)
    entry = DATASETS[args.data]
    data, desc = entry.build(model, request)
    if not (args.limit is not None and args.data in ("world", "examples")):
        _check_partners(args.shift, args.repeats, dataset_size(data))
    rank, world, device = _init_distributed(args.device)
    head = args.head if args.head is not None else default_head
    with _model_errors(args.model, "being compiled"):
        dec = lmdfx.compile(model.to(device), modalities)
    with _model_errors(args.model, f"running on {desc}"):
        result = evaluate(dec, data, shift=args.shift, repeats=args.repeats, head=head,
                          iou=entry.ground_truth and not args.no_iou,
                          progress=rank == 0 and not args.no_progress)
    if rank != 0:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "weights": args.weights, "checkpoint": args.checkpoint, "dataset": args.data,
              "data": desc, "head": head, "shift": args.shift, "repeats": args.repeats, "processes": world,
              "device": str(device), "seconds": round(time.time() - start, 1), **result.to_dict()}
    write_text(out / "evaluation.json", json.dumps(record, indent=2))
    write_text(out / "evaluation.md", _markdown(args, desc, head, world, result))
    print(f"wrote {out / 'evaluation.md'} and {out / 'evaluation.json'}")
    print(result.separation.table())
    return 0
