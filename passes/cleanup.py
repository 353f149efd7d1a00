"""Cleanup stages every pipeline ends with: fold constants, remove dead code, CSE (merge_duplicates.py), infer
shapes, sort.

Mostly onnx-ir / onnxscript library passes, configured so that they never read or fold a weight (a
weightless folder has no bytes to read, and folding a weight would copy it into the graph file).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from dsv3c.artifact.export_folder import is_weight, weights_declared
from dsv3c.export.onnx_ops import register_schemas
from dsv3c.passes.merge_duplicates import MergeDuplicatesPass
from dsv3c.passes.stages import Stage
from onnxscript.optimizer import _constant_folding

FOLD_INPUT_LIMIT = 8192  # elements: the library's default
FOLD_OUTPUT_LIMIT = 65536


def _reads_weight(node: ir.Node) -> bool | None:
    """should_fold: never fold a node that reads a weight; otherwise the library's rules."""
    for value in node.inputs:
        if value is not None and value.is_initializer() and is_weight(value):
            return False
    return None


class FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folding, with weights left alone."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=False,
            input_size_limit=FOLD_INPUT_LIMIT,
            output_size_limit=FOLD_OUTPUT_LIMIT,
            should_fold=_reads_weight,
        )
        result = folder(model)
        return ir.passes.PassResult(model, bool(result.modified))


class InferShapesPass(ir.passes.InPlacePass):
    """ONNX shape inference (knowing the dsv3c ops), with weights declared so that no data is read."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        register_schemas()
        with weights_declared(model):
            result = common.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        return ir.passes.PassResult(model, result.modified)


def cleanup_stages(prefix: str = "") -> list[Stage]:
    """The cleanup stages; `prefix` keeps names unique when a pipeline cleans up more than once."""
    p = f"{prefix}-" if prefix else ""
    return [
        Stage(f"{p}infer-shapes-first", InferShapesPass()),
        Stage(f"{p}fold-constants", FoldConstantsPass()),
        Stage(f"{p}remove-unused", common.RemoveUnusedNodesPass()),
        Stage(f"{p}cse", MergeDuplicatesPass()),  # onnx_ir's CSE, survivors stamped `merged`
        Stage(f"{p}remove-unused-again", common.RemoveUnusedNodesPass()),
        Stage(f"{p}remove-unused-functions", common.RemoveUnusedFunctionsPass()),
        Stage(f"{p}remove-unused-opsets", common.RemoveUnusedOpsetsPass()),
        Stage(f"{p}infer-shapes", InferShapesPass()),
        Stage(f"{p}topological-sort", common.TopologicalSortPass()),
    ]
