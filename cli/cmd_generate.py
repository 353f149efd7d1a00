"""dsv3c generate: greedy or sampled generation from a checkpoint (PyTorch) over the latent cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsv3c.errors import UserError
from dsv3c.runtime.sampling import SamplingConfig

HELP = "generate tokens from a checkpoint folder"


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--prompt-ids", type=_ids, action="append", default=[], metavar="IDS",
                   help="comma-separated prompt token ids; repeat for a batch")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--runtime", choices=["torch"], default="torch")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", type=_ids, default=[], help="ids that end a row (EOS from generation_config.json too)")
    p.add_argument("--json", action="store_true", help='print {"ids": [...]} (a list per prompt with several)')


def stop_ids(folder: Path, extra: list[int]) -> list[int]:
    """--stop-ids plus eos_token_id from generation_config.json when the folder has one."""
    ids = list(extra)
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError, AttributeError):
            raise UserError(f"{path}: not a valid generation config (expected a JSON object)") from None
        ids += [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]
    return ids


def run(args: argparse.Namespace) -> int:
    import torch
    from dsv3c.models.checkpoint import load_model
    from dsv3c.runtime.generate import generate
    from dsv3c.runtime.torch_backend import TorchBackend

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    if not args.prompt_ids:
        raise UserError("no prompt given; pass --prompt-ids 1,2,3 (repeat it for a batch)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backend = TorchBackend(load_model(args.model, dtype=dtype))
    stream = not args.json and len(args.prompt_ids) == 1

    def on_token(row: int, token: int) -> None:
        print(token, end=" ", flush=True)

    ids = generate(backend, args.prompt_ids, args.max_new_tokens, sampling, stop_ids(args.model, args.stop_ids),
                   on_token if stream else None)  # fmt: skip
    if args.json:
        print(json.dumps({"ids": ids[0] if len(ids) == 1 else ids}))
    elif stream:
        print(file=sys.stdout)
    else:
        for row in ids:
            print(" ".join(map(str, row)))
    return 0
