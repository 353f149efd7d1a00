"""Import dsv3c from this checkout when it is not installed (the repository root is the package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def import_dsv3c() -> None:
    try:
        import dsv3c  # noqa: F401
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(
            "dsv3c", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["dsv3c"] = module
        spec.loader.exec_module(module)
