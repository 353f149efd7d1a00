"""The full DeepSeek-V3 topology (61 layers, 256 experts, 671B parameters) exports here without weights."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from dsv3c.artifact.manifest import read_manifest
from dsv3c.models.config import PRESETS_DIR


def test_v3_config_json_alone_exports_the_whole_topology(tmp_path: Path) -> None:
    (tmp_path / "deepseek-v3").mkdir()
    (tmp_path / "deepseek-v3" / "config.json").write_bytes((PRESETS_DIR / "v3.json").read_bytes())
    out = tmp_path / "v3"
    cmd = [
        sys.executable,
        "-m",
        "dsv3c",
        "export",
        str(tmp_path / "deepseek-v3"),
        "--out",
        str(out),
        "--weights",
        "none",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest.weights == "none" and manifest.cache.layers == 61 and manifest.cache.width == 576
    decode = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    ops = collections.Counter(f"{n.domain}::{n.op_type}" for n in decode.graph.node)
    assert ops["dsv3c::MLAAttention"] == 61 and ops["dsv3c::MoE"] == 58  # 3 dense layers
    assert {f.name for f in decode.functions} == {"MLAAttention", "MoE"}
    widths = {i.name: i.type.tensor_type.shape.dim[2].dim_value for i in decode.graph.input if "past" in i.name}
    assert len(widths) == 122 and set(widths.values()) == {512, 64}  # c_kv and the shared RoPE key only
    params = sum(int(np.prod(t.dims)) for t in decode.graph.initializer)
    assert 670e9 < params < 672e9  # the main model's 671B (the MTP module lives in mtp.onnx)
