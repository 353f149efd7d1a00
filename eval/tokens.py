"""The tokenizer that turns evaluation text into ids: the model's own tokenizer.json.

An export folder finds it in the checkpoint folder it was exported from; with --against, the reference's
tokenizer serves when the model's folder has none (both models must share the vocabulary anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsv3c.errors import UserError
from dsv3c.runtime.loading import load_tokenizer, related_folders


def find_tokenizer(*models: Path) -> Any:
    for model in models:
        for folder in related_folders(model):
            if (folder / "tokenizer.json").is_file():
                return load_tokenizer(folder)
    names = " or ".join(str(m) for m in models)
    raise UserError(
        f"no tokenizer.json in {names} (nor in the checkpoint it was exported from); eval tokenizes text with it"
    )


def val_fraction(*models: Path, default: float = 0.02) -> float:
    """The held-out fraction the model was trained with (training.json of `dsv3c train`), else `default`."""
    import json

    for model in models:
        for folder in related_folders(model):
            path = folder / "training.json"
            if path.is_file():
                try:
                    value = json.loads(path.read_text()).get("train", {}).get("val_fraction")
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
                    continue
                if isinstance(value, float):
                    return value
    return default
