"""Trace the export modules into ONNX on the `meta` device: no weight is ever materialised.

Each distinct block (embedding + RoPE, a dense layer, a MoE layer, the head, the MTP module) is traced
once with torch.onnx's dynamo exporter, then compose.py stamps out one instance per layer: export time
does not grow with depth beyond the cheap stamping. Weights leave every traced block as *declared*
values (name, dtype, shape) that exporter.py binds to external data; the only values computed here are
derived from the config (the RoPE frequencies) and stay inline. The onnxscript optimizer runs while the
weights are graph inputs, so it can neither read nor rename them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript
import torch
from dsv3c.artifact.names import mtp_role
from dsv3c.export.compose import Block, Composer, rename_dim
from dsv3c.export.graphs import Embed, ExportLayer, Head, MTPGraph
from dsv3c.export.onnx_ops import translation_table
from dsv3c.models.checkpoint_layout import BIAS_FP32
from dsv3c.models.config import DeepseekV3Config
from dsv3c.models.deepseek_v3 import DecoderLayer, DeepseekV3ForCausalLM
from dsv3c.models.rope import inv_frequencies
from torch import nn

Role = str  # prefill, decode, mtp (MTP depth 0), mtp.1, mtp.2, ... (artifact.names.mtp_role)
DEFAULT_OPSET = 21
# Example sizes: >= 2 each, and all different, so torch.export keeps every dim symbolic and separate.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
DERIVED = ("inv_freq",)  # buffers computed from the config: inline in the .onnx, not weights


@dataclass
class TracedGraph:
    role: Role
    proto: onnx.ModelProto  # weights are not in it yet: neither inputs nor initializers
    weights: list[onnx.ValueInfoProto]  # declared name, dtype and shape of each weight, first use first


def skeleton(config: DeepseekV3Config, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """The model on `meta` in `dtype`; the router bias stays float32 as in checkpoints (checkpoint_layout)."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if not name.endswith(BIAS_FP32):
            p.data = p.data.to(dtype)
    return model


def trace_graphs(config: DeepseekV3Config, dtype: torch.dtype, opset: int = DEFAULT_OPSET) -> list[TracedGraph]:
    """prefill, decode and one graph per MTP module (mtp, mtp.1, ...), traced on meta."""
    model = skeleton(config, dtype)
    tracer = _Tracer(model, opset)
    embed = tracer.block(
        "embed",
        Embed(model),
        (tracer.ids, tracer.ids),
        tracer.token_dims(2),
        ["input_ids", "positions"],
        ["x", "cos", "sin"],
    )
    head = tracer.block(
        "head", Head(model), (tracer.x,), ({0: tracer.batch, 1: tracer.seq},), ["x"], ["logits", "hidden"]
    )
    graphs = [_compose_lm(tracer, "prefill", embed, head), _compose_lm(tracer, "decode", embed, head)]
    return graphs + _compose_mtp(tracer)


class _Tracer:
    """Example inputs on meta, symbolic dims, and torch.onnx.export of one block."""

    def __init__(self, model: DeepseekV3ForCausalLM, opset: int):
        self.model, self.opset, c = model, opset, model.config
        self.batch, self.seq, self.past = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
        dtype = model.lm_head.weight.dtype
        b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
        self.ids = torch.zeros(b, s, dtype=torch.long, device="meta")
        self.x = torch.zeros(b, s, c.hidden_size, dtype=dtype, device="meta")
        self.rope = torch.zeros(b, s, c.qk_rope_head_dim // 2, device="meta")
        self.cache = (
            torch.zeros(b, p, c.kv_lora_rank, dtype=dtype, device="meta"),
            torch.zeros(b, p, c.qk_rope_head_dim, dtype=dtype, device="meta"),
        )

    def token_dims(self, n: int) -> tuple[dict[int, Any], ...]:
        return tuple({0: self.batch, 1: self.seq} for _ in range(n))

    def cache_dims(self) -> tuple[dict[int, Any], ...]:
        return ({0: self.batch, 1: self.past}, {0: self.batch, 1: self.past})

    def layer(self, layer: DecoderLayer, name: str, absorbed: bool, with_past: bool) -> Block:
        args = (self.x, self.rope, self.rope, self.ids) + (self.cache if with_past else ())
        dims = self.token_dims(4) + (self.cache_dims() if with_past else ())
        inputs = ["x", "cos", "sin", "positions"] + (["past_ckv", "past_kpe"] if with_past else [])
        return self.block(name, ExportLayer(layer, absorbed), args, dims, inputs, ["x_out", "new_ckv", "new_kpe"])

    def block(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        dims: tuple[Any, ...],
        inputs: list[str],
        outputs: list[str],
    ) -> Block:
        module.eval()
        args = tuple(a.clone() for a in args)  # distinct tensors: one shared object would tie two inputs
        with _quiet():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dims,
                input_names=inputs,
                output_names=outputs,
                opset_version=self.opset,
                custom_translation_table=translation_table(),
                optimize=False,
            )
        assert program is not None
        model = program.model
        weights = _weights_to_inputs(model, self.model.config)
        with _quiet():
            onnxscript.optimizer.optimize_ir(model)
        return Block(name, ir.serde.serialize_model(model), weights)


def _compose_lm(tracer: _Tracer, role: Role, embed: Block, head: Block) -> TracedGraph:
    """Embed -> layer instances (one traced block per kind) -> Head, as CausalLMGraph.forward wires them."""
    model, decode = tracer.model, role == "decode"
    c, n = model.config, model.config.num_hidden_layers
    composer = Composer()
    composer.add(
        embed, "embed", {"input_ids": "input_ids", "positions": "positions"}, {"x": "x.0", "cos": "cos", "sin": "sin"}
    )
    kinds: dict[bool, Block] = {}
    for i, layer in enumerate(model.model.layers):
        moe = c.is_moe_layer(i)
        if moe not in kinds:
            assert isinstance(layer, DecoderLayer)
            kinds[moe] = tracer.layer(layer, f"{'moe' if moe else 'dense'}_{role}", absorbed=decode, with_past=decode)
        wires = {
            "x": f"x.{i}",
            "cos": "cos",
            "sin": "sin",
            "positions": "positions",
            "past_ckv": f"past_ckv.{i}",
            "past_kpe": f"past_kpe.{i}",
        }
        results = {"x_out": f"x.{i + 1}", "new_ckv": f"new_ckv.{i}", "new_kpe": f"new_kpe.{i}"}
        composer.add(kinds[moe], f"layers.{i}", wires, results, weight_prefix=f"model.layers.{i}.")
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if c.tie_word_embeddings else {}
    composer.add(head, "head", {"x": f"x.{n}"}, {"logits": "logits", "hidden": "hidden"}, weight_names=tied)
    cache = [f"{kind}.{i}" for i in range(n) for kind in ("ckv", "kpe")]
    inputs = ["input_ids", "positions"] + ([f"past_{name}" for name in cache] if decode else [])
    outputs = ["logits", "hidden"] + [f"new_{name}" for name in cache]
    proto = composer.model(role, inputs, outputs, embed.proto)
    if decode:
        rename_dim(proto, "seq", "q")
    return TracedGraph(role, proto, list(composer.weights.values()))


def _compose_mtp(tracer: _Tracer) -> list[TracedGraph]:
    """One graph per MTP module, each over its own one-layer cache. Modules whose block is of the same kind
    (dense or MoE) share one trace: depth d's instance takes `mtp.{d}.*` for the traced depth's weights."""
    c = tracer.model.config
    args = (tracer.ids, tracer.x, tracer.ids, *tracer.cache)
    dims = tracer.token_dims(3) + tracer.cache_dims()
    names = ["next_ids", "hidden", "positions", "past_ckv.0", "past_kpe.0"]
    outputs = ["logits", "hidden_out", "new_ckv.0", "new_kpe.0"]
    traced: dict[bool, tuple[int, Block]] = {}  # block kind (MoE or not) -> (traced depth, block)
    graphs = []
    for depth in range(c.num_nextn_predict_layers):
        moe = c.is_moe_layer(c.num_hidden_layers + depth)
        if moe not in traced:
            graph = MTPGraph(tracer.model, depth=depth, absorbed=True)
            traced[moe] = (depth, tracer.block("mtp", graph, args, dims, names, outputs))
        source, block = traced[moe]
        prefix = f"mtp.{source}."
        renamed = {w: f"mtp.{depth}.{w[len(prefix) :]}" for w in block.weights if w.startswith(prefix)}
        composer = Composer()
        composer.add(block, "mtp", {n: n for n in names}, {n: n for n in outputs}, weight_names=renamed)
        role = mtp_role(depth)
        graphs.append(
            TracedGraph(role, composer.model(role, names, outputs, block.proto), list(composer.weights.values()))
        )
    return graphs


def _weights_to_inputs(model: ir.Model, config: DeepseekV3Config) -> list[str]:
    """Turn every weight initializer into a graph input; give the derived ones (RoPE) their values."""
    graph, weights = model.graph, []
    for name, value in list(graph.initializers.items()):
        if name == "inv_freq":
            value.const_value = ir.tensor(inv_frequencies(config).numpy(), name=name)
            continue
        del graph.initializers[name]
        value.const_value = None
        graph.inputs.append(value)
        weights.append(name)
    return weights


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
