"""Names that are part of the file formats: the custom op domain and ops, and the files of a folder."""

from __future__ import annotations

DOMAIN = "dsv3c"  # opset domain of the custom nodes, also the graphs' producer_name
DOMAIN_VERSION = 1
PRODUCER = "dsv3c"
MLA_OP = "MLAAttention"  # dsv3c::MLAAttention (schema: dsv3c.export.onnx_ops)
MOE_OP = "MoE"  # dsv3c::MoE

MANIFEST_FILE = "manifest.json"  # an export folder
ENGINE_MANIFEST_FILE = "engine_manifest.json"  # an engine folder (dsv3c build)
WEIGHTS_FILE = "weights.bin"  # every weight of an export folder, once, in aligned slots
ROLES = ("prefill", "decode", "mtp")  # graph roles, in this order
