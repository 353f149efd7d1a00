"""dsv3c init: write a random checkpoint (or only its config.json) for a preset."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dsv3c.errors import UserError
from dsv3c.models.config import DeepseekV3Config, preset_names

HELP = "write a random Hugging Face style checkpoint for a preset (tiny, small, v2-lite, v3)"
DTYPES = ("fp32", "bf16", "fp8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(preset_names())}")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype; fp8 uses 128x128 block scales")
    p.add_argument("--config-only", action="store_true", help="write config.json only (any preset size)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _memory_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(args: argparse.Namespace) -> int:
    from dsv3c.artifact.atomic import atomic_folder, check_output, write_checkpoint_marker
    from dsv3c.models.checkpoint import estimate_bytes, init_random, save_model

    config = DeepseekV3Config.from_preset(args.preset)
    out: Path = args.out
    check_output(out, force=args.force)  # replaces only a folder dsv3c wrote
    if args.config_only:
        with atomic_folder(out, args.force) as tmp:
            config.save(tmp / "config.json")
            write_checkpoint_marker(tmp, "dsv3c init --config-only")
        print(f"wrote {out}/config.json ({args.preset})")
        return 0
    size = estimate_bytes(config, args.dtype)
    disk = shutil.disk_usage(out.resolve().parent if out.resolve().parent.exists() else Path.cwd()).free
    memory = _memory_available()
    # the random model is built in fp32 before conversion, so memory needs the fp32 size
    needed = estimate_bytes(config, "fp32")
    if needed > memory * 0.8 or size > disk * 0.9:
        raise UserError(
            f"preset '{args.preset}' needs {needed / 2**30:.1f} GiB of memory and {size / 2**30:.1f} GiB of disk "
            f"({memory / 2**30:.1f} GiB memory and {disk / 2**30:.1f} GiB disk free); use --config-only "
            "for its config, or export it with --weights none"
        )
    model = init_random(config, seed=args.seed)
    save_model(model, out, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {out} ({args.preset}, {args.dtype}, {size / 2**20:.1f} MiB)")
    return 0
