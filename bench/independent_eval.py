"""A trained checkpoint's loss, and its export's, recomputed without dsv3c, then compared with `dsv3c eval`.

    python bench/independent_eval.py --checkpoint runs/small-bf16 --export EXPORT --data TEXT_FILE \
        [--window 128] [--max-tokens 2048] [--out bench/results/independent_eval.json]

Nothing of dsv3c is imported: the text is tokenized with `tokenizers` from the checkpoint's tokenizer.json
(the first max-tokens ids of the file, cut into windows of --window tokens, each scored from position 0,
which is how `dsv3c eval` cuts a text file), the checkpoint is scored by transformers'
DeepseekV3ForCausalLM in float32, and the export's prefill.onnx by an onnxruntime session opened here.
`python -m dsv3c eval --json` then scores the same file on both folders in a subprocess. The loss is the
mean next-token cross-entropy over every predicted position. Exit status 1 when a pair differs by more
than --tolerance (relative).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="trained checkpoint folder (with tokenizer.json)")
    p.add_argument("--export", type=Path, required=True, help="its export folder (canonical or lowered)")
    p.add_argument("--data", type=Path, required=True, help="a UTF-8 text file")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative loss difference accepted")
    p.add_argument("--out", type=Path, help="write the losses and the run record as JSON")
    return p.parse_args()


def windows(tokenizer_file: Path, text_file: Path, window: int, max_tokens: int) -> np.ndarray:
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text_file.read_text(encoding="utf-8")).ids
    count = min(max_tokens // window, len(ids) // window)
    return np.asarray(ids[: count * window], dtype=np.int64).reshape(count, window)


def mean_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean cross-entropy (nats) of ids[:, 1:] under logits[:, :-1], in float64."""
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return float(-picked.mean())


def transformers_loss(checkpoint: Path, ids: np.ndarray) -> float:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(ids[i : i + 4])).logits for i in range(0, len(ids), 4)])
    return mean_loss(logits.numpy(), ids)


def onnxruntime_loss(export: Path, ids: np.ndarray) -> float:
    session = ort.InferenceSession(str(export / "prefill.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
    feeds = {"input_ids": ids, "positions": np.ascontiguousarray(positions)}
    missing = [n for n in names if n not in feeds]
    if missing:
        sys.exit(f"{export}/prefill.onnx wants inputs {missing} besides input_ids and positions")
    (logits,) = session.run(["logits"], feeds)
    return mean_loss(logits, ids)


def dsv3c_loss(model: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "dsv3c", "eval", str(model), "--data", str(args.data), "--json"]
    cmd += ["--window", str(args.window), "--max-tokens", str(args.max_tokens)]
    env = {"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"dsv3c eval {model} failed: {done.stderr.strip()}")
    return float(json.loads(done.stdout)["loss"])


def main() -> int:
    args = parse()
    ids = windows(args.checkpoint / "tokenizer.json", args.data, args.window, args.max_tokens)
    rows = {
        "transformers (checkpoint)": transformers_loss(args.checkpoint, ids),
        "dsv3c eval (checkpoint, torch)": dsv3c_loss(args.checkpoint, args),
        "onnxruntime direct (export)": onnxruntime_loss(args.export, ids),
        "dsv3c eval (export, ort)": dsv3c_loss(args.export, args),
    }
    reference = rows["transformers (checkpoint)"]
    worst = 0.0
    for name, loss in rows.items():
        rel = (loss - reference) / reference
        worst = max(worst, abs(rel))
        print(f"{name:32s} loss {loss:.6f}  relative to transformers {rel:+.2e}")
    print(f"{ids.size} tokens in {len(ids)} windows of {args.window}; worst relative difference {worst:.2e}")
    if args.out:
        record = {
            "command": " ".join(["python", "bench/independent_eval.py", *sys.argv[1:]]),
            "commit": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "onnxruntime": ort.__version__,
            },
            "tokens": int(ids.size),
            "losses": rows,
            "worst_relative_difference": worst,
        }
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
