"""The resumable training state: float32 master weights, AdamW moments and the step, in safe formats.

OUT/train_state/ holds model.safetensors, optimizer.safetensors (exp_avg / exp_avg_sq per parameter
name) and state.json (step, config hash, configs). Written to a temporary sibling and renamed, so an
interrupted save leaves the previous state whole. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from dsv3c.artifact.atomic import atomic_folder, write_checkpoint_marker
from dsv3c.artifact.json_file import read_json_object
from dsv3c.errors import UserError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_DIR = "train_state"


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors (MTP embedding / head share the main ones) stored once, by first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().float().contiguous().cpu()
    return out


def save_state(
    out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, meta: dict[str, Any]
) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    moments: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    moments[f"{names[id(p)]}.{key}"] = state[key].detach().float().contiguous().cpu()
    adam_steps = {
        names[id(p)]: float(optimizer.state[p]["step"]) for p in optimizer.state if "step" in optimizer.state[p]
    }
    with atomic_folder(out / STATE_DIR, overwrite=True) as tmp:
        save_file(_unique_state(model), str(tmp / "model.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        write_checkpoint_marker(tmp, "training state")
        (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "adam_steps": adam_steps}, indent=1) + "\n")


def load_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config_hash: str) -> int:
    """Restore model and optimizer from OUT/train_state; returns the step to continue from."""
    folder = out / STATE_DIR
    if not (folder / "state.json").is_file():
        raise UserError(f"--resume: {folder} has no saved training state; start without --resume")
    meta = read_json_object(folder / "state.json", "start without --resume")
    step, adam_steps = _checked_steps(meta, folder / "state.json")
    try:
        weights = load_file(str(folder / "model.safetensors"))
        moments = load_file(str(folder / "optimizer.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--resume: training state in {folder} is unreadable ({e}); start without --resume") from None
    if meta.get("config_hash") != config_hash:
        raise UserError(
            f"--resume: {folder} was saved by a run with other settings; resume with the same flags or start anew"
        )
    own = model.state_dict()
    missing = [n for n in _unique_state(model) if n not in weights]
    if missing:
        raise UserError(f"--resume: training state in {folder} lacks {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in own or own[name].shape != tensor.shape:
                raise UserError(f"--resume: training state tensor {name} does not fit this model")
            own[name].copy_(tensor)
    by_name = dict(model.named_parameters())
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in by_name.items() if q is p)
            if f"{name}.exp_avg" in moments:
                for key in ("exp_avg", "exp_avg_sq"):
                    if f"{name}.{key}" not in moments or moments[f"{name}.{key}"].shape != p.shape:
                        raise UserError(f"--resume: optimizer state {name}.{key} in {folder} does not fit this model")
                optimizer.state[p] = {
                    "step": torch.tensor(adam_steps.get(name, step), dtype=torch.float32),
                    "exp_avg": moments[f"{name}.exp_avg"].to(p.device),
                    "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(p.device),
                }
    return step


def _checked_steps(meta: dict[str, Any], path: Path) -> tuple[int, dict[str, float]]:
    """state.json's step (an int >= 0) and AdamW's per-parameter step counts (finite numbers >= 0): what
    save_state wrote, or a one-line error for a file edited or damaged since."""
    step = meta.get("step")
    if type(step) is not int or step < 0:
        raise UserError(f"{path}: step must be an integer >= 0, got {_shown(step)}; start without --resume")
    adam_steps = meta.get("adam_steps", {})
    if not isinstance(adam_steps, dict):
        raise UserError(f"{path}: adam_steps must be an object, got {_shown(adam_steps)}; start without --resume")
    for name, value in adam_steps.items():
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            raise UserError(
                f"{path}: adam_steps[{name!r:.60}] must be a finite number >= 0, got {_shown(value)}; "
                "start without --resume"
            )
    return step, adam_steps


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."
