"""The trained model as an ordinary Hugging Face checkpoint folder, its metrics and a PNG of the curves.

OUT/ gets config.json + safetensors (checkpoint names, MTP in the usual layout: its shared embedding
and head written as copies), tokenizer.json, generation_config.json and training.json (corpus origin,
configs, final metrics); metrics.jsonl and curves.png sit beside them, train_state/ too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dsv3c.artifact.atomic import write_checkpoint_marker
from dsv3c.models.checkpoint import save_model
from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def write_checkpoint(
    out: Path,
    model: DeepseekV3ForCausalLM,
    tokenizer: Path,
    record: dict[str, Any],
    dtype: str = "bf16",
    max_shard_bytes: int = 5_000_000_000,
) -> None:
    """Replace OUT's checkpoint files (other files in OUT, such as the training state, stay)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".checkpoint.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, staging, dtype=dtype, max_shard_bytes=max_shard_bytes)  # type: ignore[arg-type]
    shutil.copyfile(tokenizer, staging / "tokenizer.json")
    config = model.config
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": False}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_checkpoint_marker(staging, "trained checkpoint")
    (staging / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    for old in out.glob("model-*-of-*.safetensors"):
        old.unlink()
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
    if (out / "model.safetensors").exists() and any(out.glob("model-*-of-*.safetensors")):
        (out / "model.safetensors").unlink()  # a sharded save replaces a single-file one


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Training / validation / MTP loss and expert load against tokens; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    ax_loss.plot([m["tokens"] for m in train], [m["lm_loss"] for m in train], label="train (next token)")
    mtp = [m for m in train if "mtp_loss" in m]
    if mtp:
        ax_loss.plot([m["tokens"] for m in mtp], [m["mtp_loss"] for m in mtp], label="MTP depth 1..D (mean)")
    ax_loss.plot([m["tokens"] for m in val], [m["val_loss"] for m in val], "o-", label="validation")
    ax_loss.set_xlabel("tokens")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.legend()
    ax_loss.set_title(title)
    loads = [m for m in train if "load_max_mean" in m]
    ax_load.plot([m["tokens"] for m in loads], [m["load_max_mean"] for m in loads])
    ax_load.set_xlabel("tokens")
    ax_load.set_ylabel("expert load max / mean")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
