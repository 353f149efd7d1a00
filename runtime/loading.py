"""Open a model folder for generation: a checkpoint folder (PyTorch) or an export folder (onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from dsv3c.artifact.manifest import MANIFEST_FILE, read_manifest
from dsv3c.errors import UserError
from dsv3c.runtime.engine import Engine

Runtime = Literal["torch", "ort", "auto"]
FolderKind = Literal["checkpoint", "export"]


def folder_kind(folder: Path) -> FolderKind:
    """`export` when the folder has manifest.json, `checkpoint` when it has config.json; else a UserError."""
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass a checkpoint folder or an export folder")
    if (folder / MANIFEST_FILE).is_file():
        return "export"
    if (folder / "config.json").is_file():
        return "checkpoint"
    raise UserError(
        f"{folder}: neither a checkpoint folder (config.json + safetensors) nor an export folder (manifest.json)"
    )


def choose_runtime(folder: Path, runtime: Runtime) -> Literal["torch", "ort"]:
    kind = folder_kind(folder)
    if runtime == "auto":
        return "ort" if kind == "export" else "torch"
    if runtime == "ort" and kind == "checkpoint":
        raise UserError(f"{folder} is a checkpoint folder; --runtime ort runs an export folder (dsv3c export first)")
    if runtime == "torch" and kind == "export":
        raise UserError(f"{folder} is an export folder; --runtime torch runs the checkpoint folder it came from")
    return runtime


def open_engine(
    folder: Path,
    runtime: Runtime = "auto",
    device: Literal["cpu", "cuda"] = "cpu",
    dtype: str = "fp32",
    threads: int = 0,
) -> Engine:
    if choose_runtime(folder, runtime) == "ort":
        from dsv3c.runtime.ort_backend import OrtEngine

        return OrtEngine(folder, device, threads)
    import torch
    from dsv3c.models.checkpoint import load_model
    from dsv3c.runtime.torch_backend import TorchEngine

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    model = load_model(folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return TorchEngine(model.to(device))


def related_folders(folder: Path) -> list[Path]:
    """The folder itself, then (for an export folder) the checkpoint folder it was exported from, if present."""
    out = [folder]
    try:
        source = (read_manifest(folder).stage("export") or {}).get("source")
    except UserError:  # not an export folder (a checkpoint), or not a readable one
        source = None
    if isinstance(source, str) and _is_folder(Path(source)):
        out.append(Path(source))
    return out


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a recorded path no file system holds (a name over 255 bytes)
        return False


def load_tokenizer(folder: Path) -> Any:
    """The `tokenizers` Tokenizer from tokenizer.json in the folder (or its source checkpoint folder)."""
    path = next((f / "tokenizer.json" for f in related_folders(folder) if (f / "tokenizer.json").is_file()), None)
    if path is None:
        raise UserError(f"--prompt needs a tokenizer.json in {folder}; pass token ids with --prompt-ids instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("--prompt needs the tokenizers package: pip install 'dsv3c[text]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises plain Exceptions on a bad file
        raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def eos_ids(folder: Path) -> list[int]:
    """eos_token_id from generation_config.json (in the folder or its source checkpoint folder)."""
    for f in related_folders(folder):
        path = f / "generation_config.json"
        if not path.is_file():
            continue
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError, RecursionError, AttributeError):  # ValueError: not UTF-8, not JSON
            raise UserError(f"{path}: not a valid generation config (expected a JSON object)") from None
        if eos is None or (isinstance(eos, int) and not isinstance(eos, bool)):
            return [] if eos is None else [eos]
        if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise UserError(f"{path}: eos_token_id must be a token id or a list of them, got {str(eos)[:40]}")
        return eos
    return []
