"""Pass 1 — trace: ``nn.Module`` -> ``fx.GraphModule``.

Ensures every placeholder carries ``meta["lmd_param"]`` (its forward parameter name) and every
node carries ``meta["lmd_layer"]`` (innermost module qualified name),
``meta["lmd_source"]`` (the user's source line) and, on nodes that are a module's output,
``meta["lmd_module_outputs"]`` (the qualified names whose output the node is).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections import Counter
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace as fx_tracing

from ..errors import TraceError

# Frames in torch or in lmdfx's own compiler (not a model that happens to live in the package,
# and not a checkout folder that happens to be named "lmdfx") are not the user's source.
_LMDFX = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, os.path.join(_LMDFX, "passes") + os.sep,
             os.path.join(_LMDFX, "rules") + os.sep)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL) or os.path.dirname(path) == _LMDFX


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')


def user_source(stack_trace: str | None) -> str:
    """The innermost frame of a node's stack trace outside torch and lmdfx, as ``file:line: code``."""
    frames = [m for m in _FRAME.finditer(stack_trace or "") if not _internal(m["file"])]
    if not frames:
        return ""
    m = frames[-1]
    return f'{m["file"]}:{m["line"]}: {m["code"].strip()}'


class LMDTracer(fx.Tracer):
    """A tracer that keeps module scopes and user source lines, with configurable leaves
    (module types, module qualified names, or free functions kept as one call)."""

    def __init__(self, leaf_modules: Iterable[Any] = ()):
        leaf_modules = tuple(leaf_modules)
        super().__init__(autowrap_functions=tuple(f for f in leaf_modules if _is_function(f)))
        self.record_stack_traces = True
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.module_outputs: list[tuple[str, Any]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        self.module_outputs.append((self.path_of_module(m), out))
        return out

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        stack = node.meta.get("nn_module_stack") or {}
        node.meta["lmd_layer"] = next(reversed(stack.values()))[0] if stack else ""
        return node


def _is_function(value: Any) -> bool:
    return callable(value) and not isinstance(value, (type, str, nn.Module))


@contextlib.contextmanager
def _wrapped_kept(keep: set[tuple[int, str]]):
    """Trace into functions a library marked with ``torch.fx.wrap`` (timm's attention helpers:
    their bodies are plain tensor code our rules know, an opaque call is not), except torch.fx's
    own and those in ``keep``."""
    registry = fx_tracing._wrapped_fns_to_patch
    saved = dict(registry)
    for key, namespace in saved.items():
        if key not in keep and not str(namespace.get("__name__", "")).startswith("torch."):
            del registry[key]
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)


def _failing_wrapped(exc: BaseException) -> set[tuple[int, str]]:
    """The ``torch.fx.wrap`` functions whose bodies raised ``exc`` while being traced into."""
    keys = set()
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        key = (id(frame.f_globals), frame.f_code.co_name)
        if key in fx_tracing._wrapped_fns_to_patch:
            keys.add(key)
        tb = tb.tb_next
    return keys


def trace(model: nn.Module, leaf_modules: Iterable[Any] = (), concrete_args: dict | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ``TraceError`` saying which construct failed and what to do.
    Functions wrapped with ``torch.fx.wrap`` are traced into; one whose body cannot be traced
    stays a call, as its author meant."""
    leaf_modules = tuple(leaf_modules)
    keep: set[tuple[int, str]] = set()
    while True:
        tracer = LMDTracer(leaf_modules)
        try:
            with _wrapped_kept(keep):
                graph = tracer.trace(model, concrete_args=concrete_args)
            break
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            failing = _failing_wrapped(exc) - keep
            if not failing:
                raise TraceError(_explain(exc)) from exc
            keep |= failing
    calls: Counter[str] = Counter()
    for path, out in tracer.module_outputs:
        if isinstance(out, fx.Proxy):
            # A module called more than once: later calls are "path:1", "path:2", ...
            name = f"{path}:{calls[path]}" if calls[path] else path
            calls[path] += 1
            out.node.meta.setdefault("lmd_module_outputs", []).append(name)
    # fx may rename a placeholder whose name clashes with a node's ("flip" -> "flip_1"); the
    # placeholders follow forward's parameters in order, so record the parameter name.
    parameters = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, parameter in zip(placeholders, parameters):
        node.meta["lmd_param"] = parameter.name
    for node in graph.nodes:
        node.meta["lmd_source"] = user_source(node.meta.get("stack_trace"))
        if node.op == "call_module":
            node.meta["lmd_layer"] = node.target
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, class_name=f"{name}Traced")


def _explain(exc: Exception) -> str:
    where = ""
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        filename = frame.f_code.co_filename
        if not _internal(filename):
            where = f" at {filename}:{frame.f_lineno} (in {frame.f_code.co_name})"
            break
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "item assignment" in text:
        advice = ("the forward writes into a traced tensor in place (x[...] = ...), which symbolic tracing "
                  "cannot record. Capture it with torch.export instead: lmdfx.compile(..., frontend='export', "
                  "example_inputs=...) functionalises the write.")
    elif "control flow" in text or "iteration" in text.lower() or "Proxy" in text or "len(" in text:
        advice = ("the forward uses a traced value in Python control flow or a Python builtin. "
                  "Pass the value that decides it via compile(..., concrete_args={...}), mark the "
                  "submodule as a leaf via compile(..., leaf_modules=[...]), or rewrite the branch "
                  "with tensor ops (torch.where).")
    else:
        advice = ("mark the offending submodule as a leaf via compile(..., leaf_modules=[...]), fix "
                  "constant arguments via concrete_args, or rewrite the construct with tensor ops.")
    return f"torch.fx could not trace the model{where}: {type(exc).__name__}: {text} — {advice}"
