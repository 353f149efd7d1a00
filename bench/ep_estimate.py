"""ESTIMATE (on paper, not measured): expert-parallel decode of the full DeepSeek-V3 on 8 and 16 H200s.

    python bench/ep_estimate.py [--ranks 8 16] [--batches 1 64 256] [--context 4096]
                                [--measure-gloo 2] [--json --out bench/results/ep_estimate.json]

What is modelled is what dsv3c runs (parallel/dispatch.py): attention, dense layers, shared experts and
the LM head replicated (every rank runs the whole batch), routed experts split over the ranks, and per
MoE layer five collectives (split sizes, tokens, expert ids, outputs, all_gather of the sums), with no
overlap of communication and compute. Per decode step of a global batch B at context C, per rank:

  weights read  replicated linears + the experts the batch activates on this rank (uniform routing:
                E * (1 - (1 - k/E)^B) distinct experts per layer, 1/N of them here), fp8 with scales
  cache read    B * C * 70,272 B (every rank attends over the whole batch: replicated attention)
  FLOPs         2 * weights per token for the linears, 2*H*C*(2*r + rope) per token and layer for MLA
                over the latent cache, B*k*3*2*D*I/N for the routed experts
  all-to-all    (B/N)*k*D*2 B out and back (bf16, the (N-1)/N that leaves the rank), (B/N)*D*2*(N-1) B
                of all_gather, plus 5 latencies, per MoE layer
  time          max(bytes / HBM bandwidth, FLOPs / peak) per part, plus the all-to-all time

Inputs and where they come from (--help lists the flags that change them):
  measured   HBM bandwidth 4.17 TB/s (device copy on the H200, bench/results/gpu_h200_2026-11-28.json);
             FP8 block-scaled GEMM ~1200 TFLOP/s and bf16 ~790 TFLOP/s at large shapes (torch._scaled_mm
             on the H200, December 2026); with --measure-gloo: one MoE layer's collectives on gloo, CPU
  spec       NVLink 4: 450 GB/s per direction per GPU (8 GPUs on one NVSwitch); 16 GPUs = two such
             nodes joined by 400 Gb/s InfiniBand per GPU (50 GB/s); 141 GB of HBM per GPU
  assumed    collective latency 20 us within a node, 40 us across nodes; no overlap; uniform routing
Not measured: nothing here ran on more than one GPU (no multi-GPU machine was lent).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import import_dsv3c

import_dsv3c()

import torch  # noqa: E402
from dsv3c.models.checkpoint_layout import block_of, parameter_shapes, stored_bytes  # noqa: E402
from dsv3c.models.config import DeepseekV3Config  # noqa: E402
from dsv3c.parallel.plan import routed_expert  # noqa: E402

GB = 1e9
CACHE_BYTES_PER_TOKEN = (512 + 64) * 2 * 61  # latent + RoPE key, bf16, 61 layers: 70,272 B


@dataclass(frozen=True)
class Hardware:
    hbm_bytes_per_s: float = 4.17e12  # measured (device copy, H200)
    fp8_flops: float = 1.2e15  # measured, large shapes
    bf16_flops: float = 0.79e15  # measured, large shapes
    nvlink_bytes_per_s: float = 450e9  # spec, per direction per GPU
    ib_bytes_per_s: float = 50e9  # spec, 400 Gb/s per GPU
    gpus_per_node: int = 8
    latency_intra_s: float = 20e-6  # assumed
    latency_inter_s: float = 40e-6  # assumed
    hbm_capacity_bytes: float = 141e9  # spec


@dataclass(frozen=True)
class ModelBytes:
    replicated: int  # everything but the routed experts (MTP and embeddings included): held by every rank
    replicated_read: int  # what one decode step reads of it (no embedding table, no MTP)
    replicated_linear_params: int  # 2-D weights a token multiplies with (LM head included)
    expert: int  # one routed expert of one layer, fp8 with scales
    expert_params: int
    moe_layers: int
    replicated_bf16: int  # the same, dequantized to bf16 (what dsv3c's PyTorch runtime holds today)
    expert_bf16: int


def model_bytes(config: DeepseekV3Config) -> ModelBytes:
    block = block_of(config)
    rep = rep_read = rep_params = rep_bf16 = 0
    expert = expert_params = expert_bf16 = 0
    for name, shape in parameter_shapes(config).items():
        size, bf16 = stored_bytes(name, shape, "fp8", block), stored_bytes(name, shape, "bf16", block)
        numel = int(torch.Size(shape).numel())
        e = routed_expert(name)
        if e is not None:
            if name.startswith(f"model.layers.{config.first_k_dense_replace}.mlp.experts.0."):
                expert, expert_params, expert_bf16 = expert + size, expert_params + numel, expert_bf16 + bf16
            continue
        rep, rep_bf16 = rep + size, rep_bf16 + bf16
        if name.startswith("mtp.") or "embed_tokens" in name:
            continue
        rep_read += size
        if len(shape) == 2 and not name.endswith(".mlp.gate.weight"):
            rep_params += numel
    moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return ModelBytes(rep, rep_read, rep_params, expert, expert_params, moe, rep_bf16, expert_bf16)


@dataclass
class Estimate:
    ranks: int
    batch: int
    context: int
    weights_gb_per_rank: float
    cache_gb_per_rank: float
    fits_in_hbm: bool
    weights_ms: float
    attention_ms: float
    experts_ms: float
    all_to_all_ms: float
    all_to_all_bytes_per_token_per_layer: float  # over every link together
    step_ms: float
    tokens_per_s: float


def estimate(c: DeepseekV3Config, m: ModelBytes, hw: Hardware, ranks: int, batch: int, context: int) -> Estimate:
    E, k, D, H = c.n_routed_experts or 0, c.num_experts_per_tok or 0, c.hidden_size, c.num_attention_heads
    r, rope, L = c.kv_lora_rank, c.qk_rope_head_dim, c.num_hidden_layers
    weights = max(m.replicated_read / hw.hbm_bytes_per_s, 2 * m.replicated_linear_params * batch / hw.fp8_flops)
    cache = batch * context * CACHE_BYTES_PER_TOKEN
    attention = max(cache / hw.hbm_bytes_per_s, 2 * H * context * (2 * r + rope) * L * batch / hw.bf16_flops)
    active = E * (1 - (1 - k / E) ** batch) / ranks  # distinct experts per layer on this rank
    expert_read = active * m.expert * m.moe_layers
    expert_flops = batch * k * 2 * m.expert_params * m.moe_layers / ranks
    experts = max(expert_read / hw.hbm_bytes_per_s, expert_flops / hw.fp8_flops)
    remote = (ranks - 1) / ranks
    per_rank_tokens = batch / ranks
    a2a_bytes = per_rank_tokens * (2 * k * D * 2 * remote + D * 2 * (ranks - 1))  # out + back + gather, bf16
    off_node = max(0, ranks - hw.gpus_per_node) / ranks  # share of peers on the other node
    if off_node:
        link = max(a2a_bytes * (1 - off_node) / hw.nvlink_bytes_per_s, a2a_bytes * off_node / hw.ib_bytes_per_s)
        latency = 5 * hw.latency_inter_s
    else:
        link, latency = a2a_bytes / hw.nvlink_bytes_per_s, 5 * hw.latency_intra_s
    a2a = (link + latency) * m.moe_layers
    step = weights + attention + experts + a2a
    held = m.replicated + m.expert * E * m.moe_layers / ranks
    return Estimate(
        ranks,
        batch,
        context,
        held / GB,
        cache / GB,
        held + cache < hw.hbm_capacity_bytes,
        weights * 1e3,
        attention * 1e3,
        experts * 1e3,
        a2a * 1e3,
        a2a_bytes * ranks / max(batch, 1),
        step * 1e3,
        batch / step,
    )


# ---- measured: one V3-shaped MoE layer's collectives on gloo (CPU) --------------------------------------


def _gloo_rank(rank: int, world: int, port: int, batches: list[int], repeats: int, queue: object) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dsv3c.models.deepseek_v3 import MoE
    from dsv3c.parallel.dispatch import install_layer
    from dsv3c.parallel.group import join, leave
    from dsv3c.parallel.plan import ExpertPlan

    # V3's routing and hidden size (what the collectives carry); experts shrunk, their size carries nothing
    config = DeepseekV3Config.from_preset("v3").replace(moe_intermediate_size=8, n_shared_experts=0)
    group = join(world, "cpu", 60.0)
    plan = ExpertPlan.for_config(config, world)
    torch.manual_seed(0)
    moe = MoE(config).to(torch.bfloat16)
    dispatch = install_layer(moe, plan, group)
    rows = []
    for b in batches:
        x = torch.randn(b, 1, config.hidden_size, generator=torch.Generator().manual_seed(b)).to(torch.bfloat16)
        moe(x)  # warm-up
        dispatch.stats.reset()
        start = time.perf_counter()
        for _ in range(repeats):
            moe(x)
        wall = (time.perf_counter() - start) / repeats
        s = dispatch.stats
        rows.append({"batch": b, "collectives_ms_per_layer": 1e3 * s.seconds / repeats, "layer_ms": 1e3 * wall})
        rows[-1]["bytes_sent_per_layer"] = s.bytes_sent / repeats
    leave(barrier=True)
    if rank == 0:
        queue.put(rows)  # type: ignore[attr-defined]


def measure_gloo(world: int, batches: list[int], repeats: int) -> list[dict[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, port, batches, repeats, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    return rows


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per direction per GPU (spec: 450)")
    p.add_argument("--latency-us", type=float, default=20.0, help="per collective within a node (assumed: 20)")
    p.add_argument("--measure-gloo", type=int, default=0, metavar="N", help="also time N gloo ranks on this CPU")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    config = DeepseekV3Config.from_preset("v3")
    hw = Hardware(nvlink_bytes_per_s=args.nvlink_gbps * GB, latency_intra_s=args.latency_us * 1e-6)
    m = model_bytes(config)
    rows = [estimate(config, m, hw, n, b, args.context) for n in args.ranks for b in args.batches]
    print("ESTIMATE on paper (not measured): DeepSeek-V3 decode, fp8 weights, replicated attention, routed experts")
    print(f"split over N H200s; context {args.context}; all-to-all over NVLink (16 GPUs: 2 nodes over InfiniBand)")
    expert = f"a routed expert {m.expert / 1e6:.1f} MB, {m.moe_layers} MoE layers"
    print(f"replicated weights {m.replicated / GB:.1f} GB; {expert}")
    for n in args.ranks:
        bf16 = (m.replicated_bf16 + m.expert_bf16 * (config.n_routed_experts or 0) * m.moe_layers / n) / GB
        print(f"N={n}: {bf16:.0f} GB of weights per rank if held in bf16 (dsv3c's PyTorch runtime dequantizes fp8)")
    head = f"{'N':>3} {'B':>4} {'GB/rank':>8} {'cache GB':>8} {'fits':>4} {'weights':>8} {'attn':>7} {'experts':>8}"
    print(head + f" {'a2a ms':>7} {'a2a B/tok/layer':>15} {'step ms':>8} {'tok/s':>8}")
    print("(ms per decode step; tok/s for the whole batch, every rank serving it; a2a bytes over all links)")
    for e in rows:
        print(
            f"{e.ranks:>3} {e.batch:>4} {e.weights_gb_per_rank:>8.1f} {e.cache_gb_per_rank:>8.1f} "
            f"{'yes' if e.fits_in_hbm else 'no':>4} {e.weights_ms:>8.2f} {e.attention_ms:>7.2f} {e.experts_ms:>8.2f} "
            f"{e.all_to_all_ms:>7.2f} {e.all_to_all_bytes_per_token_per_layer:>15,.0f} {e.step_ms:>8.2f} "
            f"{e.tokens_per_s:>8.0f}"
        )
    print(
        "Replicated attention: the cache and attention FLOPs do not shrink with N (data-parallel attention, as\n"
        "DeepSeek deploys it, would divide them by N; not implemented). Five collectives per layer make the\n"
        "all-to-all latency-bound at small batches (DeepEP fuses dispatch and combine into two)."
    )
    result: dict[str, object] = {
        "kind": "estimate (paper), except 'measured_gloo'",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _commit(),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": date.today().isoformat(),
        "hardware_inputs": asdict(hw),
        "model_bytes": asdict(m),
        "estimates": [asdict(e) for e in rows],
    }
    if args.measure_gloo:
        measured = measure_gloo(args.measure_gloo, args.batches, args.repeats)
        result["measured_gloo"] = {"ranks": args.measure_gloo, "load_avg_1m": os.getloadavg()[0], "rows": measured}
        shape = "hidden 7168, top-8 of 256 experts, bf16"
        print(f"MEASURED on this CPU: one V3-shaped MoE layer ({shape}) on {args.measure_gloo} gloo ranks")
        for row in measured:
            print(
                f"  B={row['batch']:>4}: collectives {row['collectives_ms_per_layer']:.2f} ms, layer "
                f"{row['layer_ms']:.2f} ms, {row['bytes_sent_per_layer']:,.0f} B sent by rank 0"
            )
    if args.out:
        from dsv3c.artifact.atomic import write_text

        write_text(args.out, json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
