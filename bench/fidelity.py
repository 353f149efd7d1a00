"""The fidelity table: what every transformation costs a trained model, in loss, top-1 agreement and KL.

    python bench/fidelity.py --checkpoint runs/small-bf16 --data HELDOUT --calibration-data TRAIN_TEXT \\
        --out bench/results/fidelity_small-bf16.json

Every variant (eval/variants.py: canonical and bf16 export, FP8 block / per-tensor / static-calibrated /
pow2, the ort lowering with and without 8-bit weights, trt and iree lowerings) is made from the checkpoint
with dsv3c's own code under --work, then scored on the same held-out windows as the reference, the
checkpoint in PyTorch fp32 (eval/metrics.py). The trt lowering runs in onnxruntime (no TensorRT engine
runs on the GPUs here); the iree lowering runs in onnxruntime and, compiled, in IREE. With --random-report,
`quantize --report`'s random-input measure (block vs per-tensor relative logit error) is taken on the
trained export and on a random-weight checkpoint of the same config, to set beside the trained numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from _bootstrap import import_dsv3c


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="held-out text (file, folder, or training corpus)")
    p.add_argument("--calibration-data", type=Path, help="text for static calibration (default: --data)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variants", nargs="*", help="names from eval/variants.py (default: all)")
    p.add_argument("--random-report", action="store_true", help="also quantize --report's random-input measure")
    p.add_argument("--work", type=Path, default=Path("/tmp/dsv3c-fidelity"))
    p.add_argument("--out", type=Path)
    return p.parse_args()


def main() -> int:
    import_dsv3c()
    from dsv3c.errors import UserError

    args = parse()
    try:
        result = run(args)
    except UserError as e:
        print(f"fidelity: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        from dsv3c.eval.record import write_result

        write_result(args.out, result)
        print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from dsv3c.eval.calibration import WINDOW, WINDOWS_PER_BATCH
    from dsv3c.eval.iree_scorer import open_iree_scorer
    from dsv3c.eval.metrics import evaluate_many
    from dsv3c.eval.record import run_record
    from dsv3c.eval.scorer import ScorerLike, open_scorer
    from dsv3c.eval.text import eval_windows
    from dsv3c.eval.tokens import find_tokenizer, val_fraction
    from dsv3c.eval.variants import Plan, build_variants, slug

    if args.threads:
        torch.set_num_threads(args.threads)
    digest = hashlib.sha256()  # the work folder follows the weights: a retrained checkpoint gets fresh variants
    for shard in sorted(args.checkpoint.glob("*.safetensors")):
        with shard.open("rb") as f:
            digest.update(f.read(1 << 20))
    key = digest.hexdigest()[:12]
    work = args.work / f"{args.checkpoint.resolve().name}-{key}"
    tokenizer = find_tokenizer(args.checkpoint)
    reference = open_scorer(args.checkpoint, "torch", threads=args.threads)
    vocab, fraction = reference.vocab_size, val_fraction(args.checkpoint)
    windows = eval_windows(args.data, tokenizer, vocab, args.window, args.max_tokens, fraction)
    calib_data = args.calibration_data or args.data
    calib = eval_windows(calib_data, tokenizer, vocab, WINDOW, 8 * WINDOWS_PER_BATCH * WINDOW, fraction)
    calibration = [calib[i : i + WINDOWS_PER_BATCH] for i in range(0, len(calib), WINDOWS_PER_BATCH)]
    plan = Plan(args.checkpoint, work, calibration, iree_dims={"batch": 1, "seq": args.window, "q": 1, "past": 16})
    variants = build_variants(plan, args.variants)
    rows: list[dict[str, Any]] = []
    scorers: list[ScorerLike] = []
    for v in variants:
        runs = ["ort", "iree"] if v.name == "lower iree" else ["ort"]
        for runtime in runs:
            row: dict[str, Any] = {"variant": v.name, "how": v.how, "runtime": runtime, "error": v.error}
            if v.folder is not None:
                try:
                    if runtime == "iree":
                        scorers.append(open_iree_scorer(v.folder, work / "iree-compiled"))
                    else:
                        scorers.append(open_scorer(v.folder, "ort", threads=args.threads))
                    row["scorer"] = len(scorers) - 1
                except Exception as e:  # a variant onnxruntime or IREE cannot load is a result, not a crash
                    row["error"] = str(e).splitlines()[0][:300]
            rows.append(row)
    results = evaluate_many([reference, *scorers], windows, args.batch, reference)
    ref_loss, results = results[0].loss, results[1:]
    for row in rows:
        index = row.pop("scorer", None)
        if index is None:
            continue
        r = results[index]
        assert r.comparison is not None
        row.update(
            loss=r.loss,
            rel_loss_error=r.comparison.rel_loss_error,
            top1_agreement=r.comparison.top1_agreement,
            kl_mean=r.comparison.kl_mean,
            kl_max=r.comparison.kl_max,
            folder=str(Path(r.model).relative_to(work)) if r.model.startswith(str(work)) else r.model,
        )
    out: dict[str, Any] = {
        **run_record(),
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "calibration_data": str(calib_data),
        "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "window": args.window,
        "reference": {"runtime": "torch fp32", "loss": ref_loss},
        "rows": rows,
    }
    print(table(out))
    if args.random_report:
        out["random_input_report"] = random_report(plan, work, slug)
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        f"reference: PyTorch fp32, loss {result['reference']['loss']:.4f} on {result['tokens']} held-out tokens",
        "",
        "| variant | runs on | loss | rel. loss error | top-1 agreement | KL (nats/token) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "loss" not in r:
            lines.append(f"| {r['variant']} | {r['runtime']} | not measured: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['loss']:.4f} | {r['rel_loss_error']:+.3%} | "
            f"{r['top1_agreement']:.2%} | {r['kl_mean']:.2e} |"
        )
    return "\n".join(lines)


def random_report(plan: Any, work: Path, slug: Any) -> dict[str, Any]:
    """quantize --report's measure (seeded random inputs, relative logit error), block vs per-tensor FP8, on
    the trained export and on a random-weight export of the same config (what the report shows without one)."""
    from dsv3c.eval.variants import _quantize
    from dsv3c.export.exporter import export
    from dsv3c.export.source import from_folder
    from dsv3c.passes.report import compare_exports

    out: dict[str, Any] = {}
    random_export = work / "random-weights-export"
    if not (random_export / "manifest.json").is_file():
        export(from_folder(plan.checkpoint), random_export, weights="random", force=True)
    for name, canonical in (("trained weights", work / slug("canonical export")), ("random weights", random_export)):
        block, tensor = (
            canonical.parent / f"{canonical.name}-report-block",
            canonical.parent / f"{canonical.name}-report-tensor",
        )
        for folder, weights, acts in ((block, "block", "tile"), (tensor, "tensor", "tensor")):
            if not (folder / "manifest.json").is_file():
                _quantize(canonical, folder, plan, weights, acts)
        report = compare_exports(canonical, {"block fp8": block, "per-tensor fp8": tensor})
        out[name] = _logit_errors(report)
        print(f"quantize --report measure, {name}: {out[name]}")
    return out


def _logit_errors(report: Any) -> dict[str, Any]:
    rows = [r for r in report.rows if r.tensor == "logits"]
    return {f"{r.graph}": {"whole_tensor": r.errors, "median_token": r.median_token} for r in rows}


if __name__ == "__main__":
    sys.exit(main())
