"""Trace the export modules into ONNX on the `meta` device: no weight is ever materialised.

`trace_graphs(config, dtype, opset)` builds the model on meta, wraps it in the export modules and runs
torch.onnx's dynamo exporter on each. Weights leave the traced graph as *declared* values (name, dtype,
shape) that exporter.py later binds to external data; the only values computed here are those derived
from the config (the RoPE frequencies), which stay inline. The onnxscript optimizer runs while the
weights are detached, so it can neither read nor rename them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir
import onnxscript
import torch
from torch import nn

from dsv3c.export.graphs import CausalLMGraph, MTPGraph
from dsv3c.export.onnx_ops import translation_table
from dsv3c.models.checkpoint_layout import BIAS_FP32
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM
from dsv3c.models.rope import inv_frequencies

Role = Literal["prefill", "decode", "mtp"]
DEFAULT_OPSET = 21
# Example sizes: >= 2 each, and all different, so torch.export keeps every dim symbolic and separate.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
DERIVED = {"inv_freq"}  # buffers computed from the config: inline in the .onnx, not weights


@dataclass
class TracedGraph:
    role: Role
    model: ir.Model
    weights: list[ir.Value]  # detached: neither graph inputs nor initializers until bound


def skeleton(config: DeepseekV3Config, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """The model on `meta` in `dtype`; the router bias stays float32 as in checkpoints (checkpoint_layout)."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if not name.endswith(BIAS_FP32):
            p.data = p.data.to(dtype)
    return model


def trace_graphs(config: DeepseekV3Config, dtype: torch.dtype, opset: int = DEFAULT_OPSET) -> list[TracedGraph]:
    """prefill, decode and (when the config has MTP) mtp, traced on meta."""
    model = skeleton(config, dtype)
    graphs = [_trace_lm(model, "prefill", opset), _trace_lm(model, "decode", opset)]
    if config.num_nextn_predict_layers:
        graphs.append(_trace_mtp(model, opset))
    return graphs


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="meta")


def _cache_example(model: DeepseekV3ForCausalLM, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    return (_meta(EXAMPLE_BATCH, EXAMPLE_PAST, c.kv_lora_rank, dtype=dtype),
            _meta(EXAMPLE_BATCH, EXAMPLE_PAST, c.qk_rope_head_dim, dtype=dtype))  # fmt: skip


def _trace_lm(model: DeepseekV3ForCausalLM, role: Role, opset: int) -> TracedGraph:
    n, decode = model.config.num_hidden_layers, role == "decode"
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("q" if decode else "seq"), torch.export.Dim("past")
    ids = _meta(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long)
    args: tuple[Any, ...] = (ids, ids.clone())
    shapes: tuple[Any, ...] = ({0: batch, 1: seq}, {0: batch, 1: seq})
    inputs = ["input_ids", "positions"]
    if decode:
        dtype = model.lm_head.weight.dtype
        args += ([_cache_example(model, dtype) for _ in range(n)],)
        shapes += ([({0: batch, 1: past}, {0: batch, 1: past}) for _ in range(n)],)
        inputs += [f"past_{kind}.{i}" for i in range(n) for kind in ("ckv", "kpe")]
    outputs = ["logits", "hidden"] + [f"new_{kind}.{i}" for i in range(n) for kind in ("ckv", "kpe")]
    return _trace(role, CausalLMGraph(model, absorbed=decode), model.config, args, shapes, inputs, outputs, opset)


def _trace_mtp(model: DeepseekV3ForCausalLM, opset: int) -> TracedGraph:
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dtype = model.lm_head.weight.dtype
    ids = _meta(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long)
    hidden = _meta(EXAMPLE_BATCH, EXAMPLE_SEQ, model.config.hidden_size, dtype=dtype)
    args = (ids, hidden, ids.clone(), _cache_example(model, dtype))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}, ({0: batch, 1: past}, {0: batch, 1: past}))
    inputs = ["next_ids", "hidden", "positions", "past_ckv.0", "past_kpe.0"]
    outputs = ["logits", "hidden_out", "new_ckv.0", "new_kpe.0"]
    return _trace("mtp", MTPGraph(model, depth=0, absorbed=True), model.config, args, shapes, inputs, outputs, opset)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints progress and warns about things that are expected here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _trace(
    role: Role, module: nn.Module, config: DeepseekV3Config, args: tuple[Any, ...], shapes: tuple[Any, ...],
    inputs: list[str], outputs: list[str], opset: int,
) -> TracedGraph:  # fmt: skip
    module.eval()
    with _quiet():
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
            opset_version=opset, custom_translation_table=translation_table(), optimize=False, verbose=False,
        )  # fmt: skip
    assert program is not None
    model = program.model
    weights = _detach_weights(model)
    bind_derived(model, config)
    with _quiet():
        onnxscript.optimizer.optimize_ir(model)
    for value in weights:
        model.graph.inputs.remove(value)
    return TracedGraph(role, model, weights)


def _detach_weights(model: ir.Model) -> list[ir.Value]:
    """Move every weight initializer out of the graph, as a temporary input the optimizer leaves alone."""
    graph = model.graph
    weights = []
    for name, value in list(graph.initializers.items()):
        if name in DERIVED:
            continue
        del graph.initializers[name]
        value.const_value = None
        graph.inputs.append(value)
        weights.append(value)
    return weights


def bind_derived(model: ir.Model, config: DeepseekV3Config) -> None:
    """Give the derived initializers their values (they were traced on meta)."""
    value = model.graph.initializers.get("inv_freq")
    if value is not None:
        value.const_value = ir.tensor(inv_frequencies(config).numpy(), name="inv_freq")
