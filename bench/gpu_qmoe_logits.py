"""Does an 8-bit-experts decode on CUDA compute what its bf16 lowering computes, with QMoE's weights packed?

    python bench/gpu_qmoe_logits.py make runs/gpu/qmoe-check     # here: two small folders with random weights
    python bench/gpu_qmoe_logits.py check runs/gpu/qmoe-check [--out FILE] [--commit C]   # on the GPU machine

`make` saves a small DeepSeek-V2-style model (hidden 128, 8 experts of 128, softmax routing, factor 1 and a
shared expert as V2-Lite has, so that both MoE kernels route themselves on CUDA; CUDA's QMoE needs sizes
that are multiples of 64) with random bf16 weights, exports it, and lowers it with `--target
ort` three times: `bf16` (com.microsoft::MoE in float16), `8bit` (`--weights-8bit --weights-8bit-scope
experts`: QMoE) and `8bit-all` (`--weights-8bit`: the linears as MatMulNBits too). `check` runs the same
prompt's prefill on the CUDA EP through OrtEngine in each, the 8-bit one again with the weights as stored
(`DSV3C_UNPACKED_QMOE=1`), with QMoE's routing kept in the graph (`DSV3C_GRAPH_ROUTED_QMOE=1`; a CUDA
session moves it into the kernel, onnxkit/kernel_routing.py) and on the CPU EP (which keeps it), and prints
the relative error of each against the CUDA bf16 logits and how often their argmax agrees. The 8-bit
rounding costs about 1 %; unpacked weights give noise; the routing's two forms and the two EPs differ only
by the kernels' rounding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

from _bootstrap import import_dsv3c

import_dsv3c()

from dsv3c.onnxkit.session import GRAPH_ROUTED_QMOE as GRAPH_ROUTED  # noqa: E402
from dsv3c.onnxkit.session import UNPACKED_QMOE as UNPACKED  # noqa: E402

PROMPT_LENGTH = 48
# (row, folder, execution provider, environment); the first is the reference
RUNS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("bf16", "bf16", "cuda", {}),
    ("8bit", "8bit", "cuda", {}),
    ("8bit-graph-routed", "8bit", "cuda", {GRAPH_ROUTED: "1"}),
    ("8bit-unpacked", "8bit", "cuda", {UNPACKED: "1"}),
    ("8bit-cpu", "8bit", "cpu", {}),
    ("8bit-all", "8bit-all", "cuda", {}),
    ("8bit-all-cpu", "8bit-all", "cpu", {}),
)


def make(root: Path) -> None:
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.models.checkpoint import init_random, save_model
    from dsv3c.models.config import DeepseekV3Config
    from dsv3c.passes.lower import lower_folder
    from dsv3c.passes.pipelines import Target

    d = DeepseekV3Config.from_preset("tiny").to_dict()
    d |= {"hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256, "n_routed_experts": 8}
    d |= {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False}
    d |= {"num_nextn_predict_layers": 0, "routed_scaling_factor": 1.0}
    config = DeepseekV3Config.from_dict(d)
    save_model(init_random(config, seed=0), root / "ckpt", dtype="bf16")
    export(from_folder(root / "ckpt"), root / "export", weights="checkpoint", dtype="bf16")
    lower_folder(root / "export", root / "bf16", Target.ORT)
    lower_folder(root / "export", root / "8bit", Target.ORT, weights_8bit=128, linears_8bit=False)
    lower_folder(root / "export", root / "8bit-all", Target.ORT, weights_8bit=128)


def logits(folder: Path, device: Literal["cpu", "cuda"]) -> list[list[float]]:
    import torch
    from dsv3c.runtime.ort_backend import OrtEngine

    engine = OrtEngine(folder, device, roles=("prefill",))
    ids = torch.randint(0, engine.config.vocab_size, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))
    engine.start(2, PROMPT_LENGTH)
    out = engine.prefill(ids.to(device), torch.arange(PROMPT_LENGTH).expand(2, -1).contiguous().to(device))
    return out.logits.float().cpu().tolist()


def check(root: Path, out: Path | None, commit: str) -> int:
    import json

    import torch
    from dsv3c.eval.record import run_record, write_result

    got, failed = {}, []
    for name, folder, device, switches in RUNS:
        env = {**os.environ, UNPACKED: "0", GRAPH_ROUTED: "0", **switches}  # a process each: read as sessions open
        command = [sys.executable, __file__, "logits", str(root / folder), "--device", device]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"{name}: {(result.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        got[name] = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    if "bf16" not in got:
        return 2
    rows = []
    for name in [n for n in got if n != "bf16"]:
        error = float((got[name] - got["bf16"]).abs().max() / got["bf16"].abs().max())
        agree = float((got[name].argmax(-1) == got["bf16"].argmax(-1)).float().mean())
        rows.append({"graph": name, "max_error_vs_bf16": error, "argmax_agreement": agree})
        print(f"{name}: logits within {error:.2e} of the bf16 lowering's (of the largest), argmax agrees {agree:.1%}")
    if out:
        write_result(out, {**run_record(commit=commit), "prompt_length": PROMPT_LENGTH, "rows": rows, "failed": failed})
    return 2 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("make", "check", "logits"))
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--commit", default="", help="the commit run (a device's copy may carry an older .git)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="logits: the execution provider")
    args = p.parse_args()
    if args.mode == "make":
        make(args.root)
        return 0
    if args.mode == "logits":  # one folder, in a process of its own (check's helper)
        import json

        print(json.dumps(logits(args.root, args.device)))
        return 0
    return check(args.root, args.out, args.commit)


if __name__ == "__main__":
    sys.exit(main())
