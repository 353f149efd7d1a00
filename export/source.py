"""What an export reads: a checkpoint folder, a folder with only config.json, or a preset; and its hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dsv3c.errors import UserError
from dsv3c.models.config import PRESETS_DIR, DeepseekV3Config

SourceKind = Literal["checkpoint", "config", "preset"]  # config: a config-only folder, or a config in memory
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    name: str  # the folder path or the preset name, as the user gave it
    config: DeepseekV3Config
    folder: Path | None  # None for a preset or a config in memory

    @property
    def has_weights(self) -> bool:
        return self.kind == "checkpoint"

    def files(self, with_weights: bool) -> list[Path]:
        """What the export read: config.json, plus the safetensors (and their index) when weights are read."""
        if self.folder is None:
            return [PRESETS_DIR / f"{self.name}.json"] if self.kind == "preset" else []
        files = [self.folder / "config.json"]
        if with_weights:
            files += sorted(
                p for p in self.folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))
            )
        return files


def from_preset(name: str) -> Source:
    return Source("preset", name, DeepseekV3Config.from_preset(name), None)


def from_config(config: DeepseekV3Config, name: str = "config") -> Source:
    """A config built in memory (a preset with fewer layers, a test variant): no weights, no files."""
    return Source("config", name, config, None)


def from_folder(path: Path) -> Source:
    """A checkpoint folder (config.json + safetensors) or a folder holding only config.json."""
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; pass a checkpoint folder holding config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; not a Hugging Face checkpoint folder")
    has_weights = any(path.glob("*.safetensors"))
    if has_weights:
        from dsv3c.models.checkpoint import read_index

        config = read_index(path).config  # checks every header; drops MTP when the checkpoint has none
        return Source("checkpoint", str(path), config, path)
    return Source("config", str(path), DeepseekV3Config.from_json(path / "config.json"), path)


def sha256_files(files: list[Path], root: Path | None) -> str:
    """sha256 over `sha256(content)  name` lines of every file, in order (sha256sum's format)."""
    lines = []
    for f in files:
        h = hashlib.sha256()
        with f.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {f.relative_to(root) if root else f.name}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def config_sha256(config: DeepseekV3Config) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
