"""What `dsv3c inspect PATH` does depends on what PATH holds: one handler per kind of artifact.

A handler names a cheap `detect(path)` test and, as "module:function" strings, the function that inspects
the path (returning a dataclass) and the one that renders that dataclass as text (JSON is generic). The
modules are imported only when their handler is chosen, so an optional backend (TensorRT for engine
folders) never slows down or breaks the others. To add a kind, put a Handler in HANDLERS before the more
general ones. `options` names the command-line options the inspect function accepts as keywords.
The list lives in the CLI, the one layer that may use both graph/ (graphs, export folders) and runtime/
(engine folders).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3c.artifact.names import ENGINE_MANIFEST_FILE, MANIFEST_FILE
from dsv3c.errors import UserError


@dataclass(frozen=True)
class Handler:
    kind: str
    detect: Callable[[Path], bool]
    inspect: str  # "module:function", called with the path, returning a dataclass
    render_text: str  # "module:function", called with that dataclass, returning text
    options: tuple[str, ...] = ()  # keyword options of `inspect`, e.g. target_cc

    def call(self, which: str, arg: Any, **options: Any) -> Any:
        module, _, function = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), function)(arg, **options)


HANDLERS: list[Handler] = [
    Handler(
        "tensorrt engine folder",
        lambda p: p.is_dir() and (p / ENGINE_MANIFEST_FILE).is_file(),
        "dsv3c.runtime.trt.inspect:inspect_engine_folder",
        "dsv3c.runtime.trt.inspect:render_text",
        options=("target_cc",),
    ),
    Handler(
        "export folder",
        lambda p: p.is_dir() and (p / MANIFEST_FILE).is_file(),
        "dsv3c.graph.summary:inspect_path",
        "dsv3c.graph.render_text:render_inspect",
    ),
    Handler(
        "onnx model",
        lambda p: p.is_file(),
        "dsv3c.graph.summary:inspect_path",
        "dsv3c.graph.render_text:render_inspect",
    ),
]


def find_handler(path: Path) -> Handler:
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    for handler in HANDLERS:
        if handler.detect(path):
            return handler
    kinds = ", ".join(h.kind for h in HANDLERS)
    raise UserError(f"{path}: not something dsv3c can inspect (expected one of: {kinds})")
