"""Names that are part of the file formats: the custom op domain and ops, and the files of a folder."""

from __future__ import annotations

from collections.abc import Container

DOMAIN = "dsv3c"  # opset domain of the custom nodes, also the graphs' producer_name
DOMAIN_VERSION = 1
PRODUCER = "dsv3c"
MLA_OP = "MLAAttention"  # dsv3c::MLAAttention (schema: dsv3c.export.onnx_ops)
MOE_OP = "MoE"  # dsv3c::MoE
# 8-bit weights of `lower --target ort --weights-8bit`: `<weight>_q8` (uint8) and `<weight>_q8_scales`
Q8_SUFFIX, Q8_SCALES_SUFFIX = "_q8", "_q8_scales"
# a float weight the ort lowering stores transposed, as its MatMul reads it ([in, out])
TRANSPOSED_SUFFIX = "_t"
MERGED_JOIN = "+"  # the weights of MatMuls merged into one (passes/merged_matmuls.py): their names, joined

MANIFEST_FILE = "manifest.json"  # an export folder
ENGINE_MANIFEST_FILE = "engine_manifest.json"  # an engine folder (dsv3c build)
WEIGHTS_FILE = "weights.bin"  # every weight of an export folder, once, in aligned slots
ROLES = ("prefill", "decode", "mtp")  # graph roles, in this order
# the cache outputs of decode and MTP graphs that write their cache in place (`lower --target ort`):
# present_ckv.N is past_ckv.N with the step's entries written (artifact/manifest.py: IN_PLACE_RULE)
PRESENT_PREFIXES = ("present_ckv.", "present_kpe.")


def present_name(past: str) -> str:
    """The output an in-place graph returns the past input `past` (past_ckv.N) as: present_ckv.N."""
    return "present_" + past.removeprefix("past_")


def mtp_role(depth: int) -> str:
    """The graph role of MTP module `depth`: `mtp` (depth 0, the only one folders had before chained drafts),
    then `mtp.1`, `mtp.2`, ... (files mtp.1.onnx, ...), one per module of the checkpoint."""
    return "mtp" if depth == 0 else f"mtp.{depth}"


def mtp_roles(roles: Container[str]) -> list[str]:
    """The MTP roles among `roles`, depth 0 first, as far as the depths run without a gap."""
    out: list[str] = []
    while mtp_role(len(out)) in roles:
        out.append(mtp_role(len(out)))
    return out
