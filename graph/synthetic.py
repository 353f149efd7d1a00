"""Hand-made graphs shaped like dsv3c's exports and pass outputs, for the graph tests and the scale benchmark.

`build_model` writes a decoder in the exporter's vocabulary: checkpoint-named weight initializers
(`model.layers.{i}.self_attn.q_a_proj.weight`), `/model/layers.{i}/...` node names, RMSNorms, residual
adds, `dsv3c::MLAAttention` and `dsv3c::MoE` nodes with model-local functions as their bodies. The bodies
are simplified stand-ins (they run, they are not MLA or DeepSeekMoE). `quantize_fp8` builds what the real
FP8 passes build (names, scale expansion, DequantizeLinear in front of the weight's reader, tiled activation
Q/DQ), so that the graph tests and the scale benchmark need no export; `inline_custom` and `lower_moe_ort`
mimic lowerings in two other conventions (custom node name kept, output names kept) that the diff must also
recognise. Pairs from the real pipeline are tested in tests/test_graph_pipeline.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

OPSET = 21
FP8 = TensorProto.FLOAT8E4M3FN
FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class Topology:
    layers: int = 2
    hidden: int = 256
    q_rank: int = 256
    kv_rank: int = 128
    heads_dim: int = 256  # num_heads * head_dim
    ff: int = 256
    dense_layers: int = 1  # the first layers have a dense MLP, the others MoE + shared experts
    experts: int = 4
    top_k: int = 2
    moe_ff: int = 128
    vocab: int = 64
    extra_linears: int = 0  # more linears per layer (to reach a target count for benchmarks)
    data: bool = True  # False: initializers declared in a missing external file (like `--weights none`)


class _Builder:
    def __init__(self, topo: Topology, seed: int) -> None:
        self.topo, self.rng = topo, np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()

    def init(self, name: str, shape: tuple[int, ...], scale: float = 0.05, value: np.ndarray | None = None) -> str:
        if name in self.names:
            return name
        self.names.add(name)
        if value is not None:
            self.inits.append(nh.from_array(value, name))
        elif self.topo.data:
            self.inits.append(nh.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        else:
            self.inits.append(declared(name, FLOAT, shape))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        return self.init(name, value.shape, value=value)

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", n_out: int = 1, **attrs: Any) -> str:
        outputs = [f"{name}_output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def linear(self, x: str, prefix: str, weight: str, shape: tuple[int, int], transposed: bool = False) -> str:
        """x @ W: W stored [in, out], or as the checkpoint's [out, in] behind a Transpose."""
        if transposed:
            w = self.node("Transpose", [self.init(weight, shape[::-1])], f"{prefix}/Transpose", perm=[1, 0])
        else:
            w = self.init(weight, shape)
        return self.node("MatMul", [x, w], f"{prefix}/MatMul")

    def rms_norm(self, x: str, prefix: str, weight: str, dim: int) -> str:
        axes = self.const("const_axes_last", np.array([-1], np.int64))
        eps = self.const("const_eps", np.array(1e-6, np.float32))
        sq = self.node("Mul", [x, x], f"{prefix}/Mul")
        mean = self.node("ReduceMean", [sq, axes], f"{prefix}/ReduceMean", keepdims=1)
        root = self.node("Sqrt", [self.node("Add", [mean, eps], f"{prefix}/Add")], f"{prefix}/Sqrt")
        normed = self.node("Div", [x, root], f"{prefix}/Div")
        w = self.init(weight, (dim,), value=np.ones(dim, np.float32) if self.topo.data else None)
        return self.node("Mul", [normed, w], f"{prefix}/Mul_1")

    def mlp(self, x: str, prefix: str, names: str, ff: int) -> str:
        d = self.topo.hidden
        gate = self.linear(x, f"{prefix}/gate_proj", f"{names}.gate_proj.weight", (d, ff))
        up = self.linear(x, f"{prefix}/up_proj", f"{names}.up_proj.weight", (d, ff))
        act = self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{prefix}/act/Sigmoid")], f"{prefix}/act/Mul")
        hidden = self.node("Mul", [act, up], f"{prefix}/Mul")
        return self.linear(hidden, f"{prefix}/down_proj", f"{names}.down_proj.weight", (ff, d))

    def layer(self, i: int, x: str) -> str:
        t, p, n = self.topo, f"/model/layers.{i}", f"model.layers.{i}"
        h = self.rms_norm(x, f"{p}/input_layernorm", f"{n}.input_layernorm.weight", t.hidden)
        q = self.linear(h, f"{p}/self_attn/q_a_proj", f"{n}.self_attn.q_a_proj.weight", (t.hidden, t.q_rank))
        q = self.rms_norm(q, f"{p}/self_attn/q_a_layernorm", f"{n}.self_attn.q_a_layernorm.weight", t.q_rank)
        q = self.linear(q, f"{p}/self_attn/q_b_proj", f"{n}.self_attn.q_b_proj.weight", (t.q_rank, t.heads_dim))
        kv = self.linear(
            h, f"{p}/self_attn/kv_a_proj_with_mqa", f"{n}.self_attn.kv_a_proj_with_mqa.weight", (t.hidden, t.kv_rank)
        )
        wkv_b = self.init(f"{n}.self_attn.kv_b_proj.weight", (t.kv_rank, t.heads_dim))
        attn = self.node(
            "MLAAttention",
            [q, kv, wkv_b, "positions"],
            f"{p}/self_attn/MLAAttention",
            domain="dsv3c",
            num_heads=2,
            softmax_scale=0.125,
        )
        o = self.linear(attn, f"{p}/self_attn/o_proj", f"{n}.self_attn.o_proj.weight", (t.heads_dim, t.hidden), True)
        x = self.node("Add", [x, o], f"{p}/Add")
        h = self.rms_norm(x, f"{p}/post_attention_layernorm", f"{n}.post_attention_layernorm.weight", t.hidden)
        if i < t.dense_layers:
            y = self.mlp(h, f"{p}/mlp", f"{n}.mlp", t.ff)
        else:
            shared = self.mlp(h, f"{p}/mlp/shared_experts", f"{n}.mlp.shared_experts", t.moe_ff)
            e, d, f = t.experts, t.hidden, t.moe_ff
            m = f"{n}.mlp"
            inputs = [
                h,
                self.init(f"{m}.gate.weight", (e, d)),
                self.init(f"{m}.gate.e_score_correction_bias", (e,)),
                self.init(f"{m}.experts.gate_proj.weight", (e, f, d)),
                self.init(f"{m}.experts.up_proj.weight", (e, f, d)),
                self.init(f"{m}.experts.down_proj.weight", (e, d, f)),
            ]
            moe = self.node(
                "MoE",
                inputs,
                f"{p}/mlp/MoE",
                domain="dsv3c",
                top_k=t.top_k,
                n_group=1,
                topk_group=1,
                norm_topk_prob=1,
                routed_scaling_factor=2.5,
                scoring_func="sigmoid",
                topk_method="noaux_tc",
            )
            y = self.node("Add", [shared, moe], f"{p}/mlp/Add")
        for k in range(t.extra_linears):
            y = self.linear(y, f"{p}/mlp/extra.{k}", f"{n}.mlp.extra.{k}.weight", (t.hidden, t.hidden))
        return self.node("Add", [x, y], f"{p}/Add_1")


def declared(name: str, elem_type: int, shape: tuple[int, ...], location: str = "weights.bin") -> onnx.TensorProto:
    """An initializer whose data lives in an external file that is not written (a `--weights none` export)."""
    t = onnx.TensorProto(name=name, data_type=elem_type, dims=shape, data_location=TensorProto.EXTERNAL)
    nbytes = math.prod(shape) * np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        t.external_data.add(key=key, value=value)
    return t


def _functions() -> list[onnx.FunctionProto]:
    """Stand-in bodies: they run in onnxruntime and read every input; they are not the real algorithms."""
    std = [helper.make_opsetid("", OPSET)]
    axes = helper.make_node("Constant", [], ["axes0"], name="axes0", value=nh.from_array(np.array([0], np.int64)))
    mla = helper.make_function(
        "dsv3c",
        "MLAAttention",
        ["q", "ckv", "wkv_b", "positions"],
        ["out"],
        [
            helper.make_node("MatMul", ["ckv", "wkv_b"], ["kv"], name="MatMul"),
            helper.make_node("Sigmoid", ["kv"], ["gate"], name="Sigmoid"),
            helper.make_node("Mul", ["q", "gate"], ["out"], name="Mul"),
        ],
        std,
        attributes=["num_heads", "softmax_scale"],
    )
    moe = helper.make_function(
        "dsv3c",
        "MoE",
        ["x", "router", "bias", "gate", "up", "down"],
        ["y"],
        [
            axes,
            helper.make_node("ReduceMean", ["gate", "axes0"], ["g"], name="ReduceMean", keepdims=0),
            helper.make_node("ReduceMean", ["up", "axes0"], ["u"], name="ReduceMean_1", keepdims=0),
            helper.make_node("ReduceMean", ["down", "axes0"], ["d"], name="ReduceMean_2", keepdims=0),
            helper.make_node("Transpose", ["g"], ["gt"], name="Transpose", perm=[1, 0]),
            helper.make_node("Transpose", ["u"], ["ut"], name="Transpose_1", perm=[1, 0]),
            helper.make_node("Transpose", ["d"], ["dt"], name="Transpose_2", perm=[1, 0]),
            helper.make_node("MatMul", ["x", "gt"], ["hg"], name="MatMul"),
            helper.make_node("MatMul", ["x", "ut"], ["hu"], name="MatMul_1"),
            helper.make_node("Sigmoid", ["hg"], ["sg"], name="Sigmoid"),
            helper.make_node("Mul", ["hg", "sg"], ["act"], name="Mul"),
            helper.make_node("Mul", ["act", "hu"], ["hidden"], name="Mul_1"),
            helper.make_node("MatMul", ["hidden", "dt"], ["y"], name="MatMul_2"),
        ],
        std,
        attributes=[
            "top_k",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "routed_scaling_factor",
            "scoring_func",
            "topk_method",
        ],
    )
    return [mla, moe]


def build_model(topo: Topology | None = None, seed: int = 0) -> onnx.ModelProto:
    """A decoder over `tokens` positions: input_ids, positions [tokens] -> logits [tokens, vocab]."""
    topo = topo or Topology()
    b = _Builder(topo, seed)
    x = b.node(
        "Gather",
        [b.init("model.embed_tokens.weight", (topo.vocab, topo.hidden), 1.0), "input_ids"],
        "/model/embed_tokens/Gather",
    )
    for i in range(topo.layers):
        x = b.layer(i, x)
    x = b.rms_norm(x, "/model/norm", "model.norm.weight", topo.hidden)
    b.linear(x, "/lm_head", "lm_head.weight", (topo.hidden, topo.vocab))
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        b.nodes,
        "dsv3c_synthetic",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["tokens"]) for n in ("input_ids", "positions")],
        [helper.make_tensor_value_info("logits", FLOAT, ["tokens", topo.vocab])],
        b.inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("dsv3c", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=_functions(), ir_version=10, producer_name="dsv3c")


def save(model: onnx.ModelProto, path: str) -> None:
    """Write `model` (a model whose initializers are declared external keeps pointing at its missing file)."""
    onnx.save_model(model, path)


# ---- mimics of the passes (issue 4) ---------------------------------------------------------------------


def _block_quantize(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """float [R, C] -> (fp8 [R, C], scale [ceil(R/b), ceil(C/b)]) with scale = amax(block) / 448."""
    rows, cols = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
    padded = np.zeros((rows * block, cols * block), np.float32)
    padded[: w.shape[0], : w.shape[1]] = w
    amax = np.abs(padded.reshape(rows, block, cols, block)).max(axis=(1, 3))
    scale = np.where(amax == 0, 1.0, amax / 448.0).astype(np.float32)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[: w.shape[0], : w.shape[1]]
    return (w / full).astype(ml_dtypes.float8_e4m3fn), scale


class _Named:
    """Nodes named `{prefix}/{what}` (a repeated name gets `_1`, `_2`), outputs named as their node: the
    naming of the passes' Builder (passes/builder.py)."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.count = prefix, list[onnx.NodeProto](), dict[str, int]()

    def op(self, op: str, inputs: list[str], what: str, **attrs: Any) -> str:
        n = self.count.get(what, 0)
        self.count[what] = n + 1
        name = f"{self.prefix}/{what}" + (f"_{n}" if n else "")
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def ints(self, *values: int, what: str) -> str:
        return self.op("Constant", [], what, value=nh.from_array(np.array(values, np.int64)))

    def const(self, value: float, what: str) -> str:
        return self.op("Constant", [], what, value=nh.from_array(np.array(value, np.float32)))


def _quantize_weight(g: onnx.GraphProto, w: onnx.TensorProto, block: int) -> tuple[list[onnx.NodeProto], str]:
    """`w` [(E,) R, C] -> the same name in FLOAT8E4M3FN, `{w}_scale_inv` [(E,) ceil(R/b), ceil(C/b)] (DeepSeek's
    128x128 block scales, stored as they are), and the pass's dequantization: the scales repeated over each
    block's rows (Unsqueeze -> Expand -> Reshape, -> Slice for a partial edge block), then
    DequantizeLinear(w, scales, axis=-1, block_size=b). Returns the nodes and the dequantized tensor."""
    *lead, rows, cols = (int(d) for d in w.dims)
    r = len(lead)
    scale_dims = (*lead, math.ceil(rows / block), math.ceil(cols / block))
    scale_name = f"{w.name}_scale_inv"
    if w.data_location == TensorProto.EXTERNAL:
        fp8, scale_t = declared(w.name, FP8, tuple(w.dims)), declared(scale_name, FLOAT, scale_dims)
    else:
        array = nh.to_array(w).reshape(-1, rows, cols)
        parts = [_block_quantize(x, block) for x in array]
        q = np.stack([p[0] for p in parts]).reshape(tuple(w.dims))
        fp8 = helper.make_tensor(w.name, FP8, tuple(w.dims), q.view(np.uint8).tobytes(), raw=True)
        scale_t = nh.from_array(np.stack([p[1] for p in parts]).reshape(scale_dims), scale_name)
    w.CopyFrom(fp8)
    g.initializer.append(scale_t)
    b = _Named(w.name.removesuffix(".weight"))
    s = b.op("Unsqueeze", [scale_name, b.ints(r + 1, what="axes")], "scale_unsqueeze")
    s = b.op("Expand", [s, b.ints(*([1] * (r + 1) + [block, 1]), what="tile")], "scale_expand")
    s = b.op("Reshape", [s, b.ints(*([0] * r + [scale_dims[-2] * block, -1]), what="rows")], "scale_rows")
    if scale_dims[-2] * block != rows:
        s = b.op("Slice", [s, b.ints(0, what="start"), b.ints(rows, what="end"), b.ints(r, what="axes")], "scale_crop")
    dq = b.op("DequantizeLinear", [w.name, s], "dequantize", axis=-1, block_size=block)
    return b.nodes, dq


def _quantize_activation(prefix: str, x: str, k: int, block: int) -> tuple[list[onnx.NodeProto], str]:
    """The pass's online activation Q/DQ of x [T, k] (per token, per `block` channels), named `{prefix}/input/...`."""
    b = _Named(prefix + "/input")
    tiles, pad = math.ceil(k / block), -k % block
    h = b.op("Pad", [x, b.ints(0, 0, 0, pad, what="pads")], "pad") if pad else x
    t = b.op("Reshape", [h, b.ints(0, tiles, block, what="tiles")], "to_tiles")
    amax = b.op("ReduceMax", [b.op("Abs", [t], "abs"), b.ints(-1, what="axes")], "amax", keepdims=1)
    top = b.op("Max", [amax, b.const(1e-4, "floor")], "max")
    scale = b.op("Div", [top, b.const(448.0, "fp8_max")], "scale")
    q = b.op("QuantizeLinear", [t, scale], "quantize", output_dtype=FP8, axis=-1, block_size=block)
    dq = b.op("DequantizeLinear", [q, scale], "dequantize", axis=-1, block_size=block)
    y = b.op("Reshape", [dq, b.ints(0, tiles * block, what="channels")], "from_tiles")
    if pad:
        y = b.op("Slice", [y, b.ints(0, what="start"), b.ints(k, what="end"), b.ints(-1, what="axes")], "crop")
    return b.nodes, y


def quantize_fp8(
    model: onnx.ModelProto,
    block: int = 128,
    skip: tuple[str, ...] = ("lm_head",),
    experts: bool = True,
    activations: bool = True,
) -> onnx.ModelProto:
    """What `dsv3c quantize` does (passes/fp8_weights.py, fp8_activations.py), on these hand-made graphs.

    Every MatMul over a float weight initializer (the checkpoint's [out, in] behind a Transpose, or [in, out]
    read directly) and the weights the custom nodes read (MLA's kv_b_proj, the MoE's stacked experts; not
    the router) get fp8 weights in DeepSeek's block scheme, dequantized in the graph in front of their reader;
    the MatMuls' activations get online Q/DQ in 1 x `block` tiles, one per activation tensor, named after the
    first linear that reads it. `skip`: weight names left in high precision; `activations=False`: weights only.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    before: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes to insert in front of it
    users: dict[str, list[tuple[onnx.NodeProto, int, str]]] = {}  # activation -> (MatMul, channels, weight)

    def quantize(w: onnx.TensorProto, reader: onnx.NodeProto, k: int) -> None:
        nodes, dq = _quantize_weight(g, w, block)
        before.setdefault(id(reader), []).extend(nodes)
        reader.input[k] = dq

    for node in g.node:
        if node.op_type == "MatMul":
            src = producers.get(node.input[1])
            transposed = src is not None and src.op_type == "Transpose"
            name = src.input[0] if src is not None and transposed else node.input[1]
            w = inits.get(name)
            if w is None or w.data_type != FLOAT or len(w.dims) != 2 or any(x in name for x in skip):
                continue
            quantize(w, src if src is not None and transposed else node, 0 if transposed else 1)
            users.setdefault(node.input[0], []).append((node, int(w.dims[1] if transposed else w.dims[0]), name))
        elif node.domain == "dsv3c":
            for k, name in enumerate(node.input):
                w = inits.get(name)
                if w is None or w.data_type != FLOAT or len(w.dims) < 2 or any(x in name for x in skip):
                    continue
                if "kv_b_proj" in name or (experts and ".experts." in name):
                    quantize(w, node, k)
    if activations:
        order = {id(n): k for k, n in enumerate(g.node)}
        for x, readers in users.items():
            first = min(readers, key=lambda r: order[id(r[0])])
            nodes, y = _quantize_activation(readers[0][2].removesuffix(".weight"), x, readers[0][1], block)
            before.setdefault(id(first[0]), []).extend(nodes)
            for mm, _, _ in readers:
                mm.input[0] = y
    nodes = [n for node in g.node for n in (*before.get(id(node), []), node)]
    del g.node[:]
    g.node.extend(nodes)
    return out


def inline_custom(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every custom node by its function body; body nodes are named `<custom node>/<body node>`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    functions = {(f.domain, f.name): f for f in out.functions}
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        f = functions.get((node.domain, node.op_type))
        if f is None:
            nodes.append(node)
            continue
        rename = dict(zip(f.input, node.input, strict=True)) | dict(zip(f.output, node.output, strict=True))
        for body in f.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(body)
            copy.name = f"{node.name}/{body.name}"
            for field in (copy.input, copy.output):
                for k, x in enumerate(field):
                    field[k] = rename.get(x, f"{node.name}/{x}")
            nodes.append(copy)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.functions[:]
    kept = [o for o in out.opset_import if o.domain != "dsv3c"]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out


def lower_moe_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """dsv3c::MoE -> com.microsoft::MoE (same node name), its router as in-graph nodes named `<node>/router/...`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if (node.domain, node.op_type) != ("dsv3c", "MoE"):
            nodes.append(node)
            continue
        x, router, _bias, gate, up, down = node.input
        p = node.name
        nodes.append(
            helper.make_node("Transpose", [router], [f"{p}/router/w"], name=f"{p}/router/Transpose", perm=[1, 0])
        )
        nodes.append(
            helper.make_node("MatMul", [x, f"{p}/router/w"], [f"{p}/router/logits"], name=f"{p}/router/MatMul")
        )
        nodes.append(helper.make_node("Concat", [gate, up], [f"{p}/fc1"], name=f"{p}/fc1/Concat", axis=1))
        top_k = next(a.i for a in node.attribute if a.name == "top_k")
        nodes.append(
            helper.make_node(
                "MoE",
                [x, f"{p}/router/logits", f"{p}/fc1", "", down],
                list(node.output),
                name=p,
                domain="com.microsoft",
                k=top_k,
                activation_type="swiglu",
                swiglu_fusion=1,
            )
        )
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def write_export(folder: Path, models: dict[str, onnx.ModelProto], layers: int = 2) -> None:
    """Write `models` by role as an export folder (manifest.json in the exporter's format).

    Models with inline data get it moved to `<role>.weights.bin`; declared-only models keep pointing at their
    missing `weights.bin`, as a `--weights none` export does.
    """
    from dsv3c.artifact.manifest import CacheLayout, Manifest, Signature, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    for role, model in models.items():
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        inline = any(t.data_location != TensorProto.EXTERNAL for t in copy.graph.initializer)
        if inline:
            onnx.save_model(
                copy,
                folder / f"{role}.onnx",
                save_as_external_data=True,
                location=f"{role}.weights.bin",
                size_threshold=1024,
            )
        else:
            onnx.save_model(copy, folder / f"{role}.onnx")
    graphs: dict[str, str | None] = {"prefill": None, "decode": None, "mtp": None}
    graphs.update({role: f"{role}.onnx" for role in models})
    manifest = Manifest(
        config={},
        weights="random",
        dtype="float32",
        opset=OPSET,
        graphs=graphs,
        signatures={role: Signature([], []) for role in models},
        cache=CacheLayout(layers, 1, 512, 64, "float32"),
        stages=[],
        weights_file=None,
    )
    write_manifest(manifest, folder)
