"""Expert load on held-out text, per MoE layer (max/mean and a histogram), from PyTorch and the exported graph.

    python bench/expert_load.py --checkpoint CK --data HELDOUT [--checkpoint CK_GAMMA0 ...] --out bench/results/x.json

For each checkpoint (e.g. trained with and without the bias updates), the same held-out windows go through
the PyTorch model (a hook counts each router's choices) and through the export lowered to portable ONNX
(its routing TopK indices made outputs, run in onnxruntime): eval/expert_load.py. The two counts must be
the same numbers; `same` says whether they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c


def main() -> int:
    import_dsv3c()
    from dsv3c.errors import UserError
    from dsv3c.eval.expert_load import format_loads, graph_loads, torch_loads
    from dsv3c.eval.record import run_record, write_result
    from dsv3c.eval.text import eval_windows
    from dsv3c.eval.tokens import find_tokenizer, val_fraction
    from dsv3c.models.config import DeepseekV3Config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, action="append", required=True, help="repeat to compare models")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--work", type=Path, default=Path("/tmp/dsv3c-expert-load"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    models: list[dict[str, Any]] = []
    try:
        for checkpoint in args.checkpoint:
            config = DeepseekV3Config.from_json(checkpoint / "config.json")
            windows = eval_windows(
                args.data,
                find_tokenizer(checkpoint),
                config.vocab_size,
                args.window,
                args.max_tokens,
                val_fraction(checkpoint),
            )
            work = args.work / str(checkpoint.resolve()).strip("/").replace("/", "_")  # one per checkpoint
            export = work / "export"
            if not (export / "manifest.json").is_file():
                from dsv3c.export.exporter import export as run_export
                from dsv3c.export.source import from_folder

                work.mkdir(parents=True, exist_ok=True)
                run_export(from_folder(checkpoint), export, weights="checkpoint", force=True)
            assert config.n_routed_experts is not None
            from_torch = torch_loads(checkpoint, windows)
            from_graph = graph_loads(export, work, windows, config.n_routed_experts)
            same = [a.counts for a in from_torch] == [b.counts for b in from_graph]
            print(format_loads(f"{checkpoint} (PyTorch), {windows.size} tokens", from_torch))
            print(f"exported graph (onnxruntime): {'the same counts' if same else 'DIFFERENT counts'}")
            for a, b in zip(from_torch, from_graph, strict=False):
                print(f"  layer {a.layer}: max/mean torch {a.max_over_mean:.4f}, graph {b.max_over_mean:.4f}")
            models.append(
                {
                    "checkpoint": str(checkpoint),
                    "training": _training(checkpoint),
                    "tokens": int(windows.size),
                    "same": same,
                    "torch": [x.to_dict() for x in from_torch],
                    "graph": [x.to_dict() for x in from_graph],
                }
            )
    except UserError as e:
        print(f"expert_load: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_result(args.out, {**run_record(), "data": str(args.data), "models": models})
        print(f"wrote {args.out}")
    return 0 if all(m["same"] for m in models) else 1


def _training(checkpoint: Path) -> dict[str, Any]:
    """The balancing knobs the checkpoint was trained with (training.json), when it says."""
    import json

    path = checkpoint / "training.json"
    if not path.is_file():
        return {}
    train = json.loads(path.read_text()).get("train", {})
    return {k: train[k] for k in ("bias_gamma", "balance_alpha", "steps", "precision") if k in train}


if __name__ == "__main__":
    sys.exit(main())
