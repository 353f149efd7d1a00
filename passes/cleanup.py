"""Cleanup stages every pipeline ends with: fold constants, remove dead code, CSE (merge_duplicates.py), infer
shapes, sort; and the lifting of constants into initializers that TensorRT's pipeline runs before them.

Mostly onnx-ir / onnxscript library passes, configured so that they never read or fold a weight (a
weightless folder has no bytes to read, and folding a weight would copy it into the graph file).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from dsv3c.artifact import provenance
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


FOLDED = provenance.Rewrite(provenance.FOLDED)
LIFTED = provenance.Rewrite(provenance.LIFTED)


class FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folding, with weights left alone. What it makes says what it replaced: a Constant
    node is marked `folded`, an initializer (the folder makes those in the main graph) carries `stage` and
    `folded` on its value, each with the nodes it replaced as its origin: the folded node, whose output name it
    keeps, and the removed nodes whose values the folder records as contributing
    (`pkg.onnxscript.optimizer.folded_from`)."""

    def __init__(self, stage: str | None = None) -> None:
        super().__init__()
        self.stage = stage

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _constant_folding.FoldConstantsPass(
            shape_inference=False,
            input_size_limit=FOLD_INPUT_LIMIT,
            output_size_limit=FOLD_OUTPUT_LIMIT,
            should_fold=_reads_weight,
        )
        graph = model.graph
        before, initializers = list(graph), set(graph.initializers)
        producers = {out.name: node for node in before for out in node.outputs if out.name}
        result = folder(model)
        if result.modified:
            left = set(graph)

            def origin(value: ir.Value) -> list[ir.Node]:
                names = [value.name, *sorted(value.meta.get(_constant_folding.FOLDED_FROM_KEY, ()))]
                return [p for name in names if name and (p := producers.get(name)) is not None and p not in left]

            made = set(before)
            for node in graph:
                if node not in made and node.op_type == "Constant" and (o := origin(node.outputs[0])):
                    provenance.stamp(node, rewrite=FOLDED, origin=o)
            for name, value in graph.initializers.items():
                if name not in initializers and (o := origin(value)):
                    value.metadata_props.update(provenance.props(stage=self.stage, rewrite=FOLDED, origin=o))
        return ir.passes.PassResult(model, bool(result.modified))


class LiftConstantsPass(ir.passes.InPlacePass):
    """onnx_ir's lifting of Constants into initializers; each initializer it makes is stamped with `stage` and
    `lifted`, with the Constant it replaced as its origin (or that Constant's origin, when the folder made it).
    An initializer is no node: its marks are its value's metadata_props, saved in the graph's value_info."""

    def __init__(self, stage: str, size_limit: int = 1) -> None:
        super().__init__()
        self.stage = stage
        self.lift = common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=size_limit)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        constants = {n.outputs[0].name: n for n in graph if n.op_type == "Constant" and n.outputs[0].name}
        before = set(graph.initializers)
        result = self.lift(model)
        for name, value in graph.initializers.items():
            constant = constants.get(name)
            if name in before or constant is None:
                continue
            marks = provenance.read(constant)
            folded = marks.rewrite is not None and marks.rewrite.kind == provenance.FOLDED
            origin = marks.origin if folded else provenance.origin_names(constant)
            value.metadata_props.update(provenance.props(stage=self.stage, rewrite=LIFTED, origin=origin))
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
        Stage(f"{p}fold-constants", FoldConstantsPass(f"{p}fold-constants")),
        Stage(f"{p}remove-unused", common.RemoveUnusedNodesPass()),
        Stage(f"{p}cse", MergeDuplicatesPass()),  # onnx_ir's CSE, survivors stamped `merged`
        Stage(f"{p}remove-unused-again", common.RemoveUnusedNodesPass()),
        Stage(f"{p}remove-unused-functions", common.RemoveUnusedFunctionsPass()),
        Stage(f"{p}remove-unused-opsets", common.RemoveUnusedOpsetsPass()),
        Stage(f"{p}infer-shapes", InferShapesPass()),
        Stage(f"{p}topological-sort", common.TopologicalSortPass()),
    ]
