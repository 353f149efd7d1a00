"""Session settings tried for onnxruntime's CUDA graph capture (bench/capture_variants.py), by name, as
runtime/ort_cuda_graph.py's StaticDecoder keyword arguments; bench/gpu_decode.py --capture-settings picks one."""

from __future__ import annotations

from typing import Any

AS_REQUESTED = {"arena_extend_strategy": "kSameAsRequested"}
CAPTURE_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},  # six uncaptured runs, then the capture (StaticDecoder's default since 2026-12-02)
    "two-warm-up-runs": {"warmup_runs": 2},  # the default before: V2-Lite's batch 32 failed with it
    "more-warm-up-runs": {"warmup_runs": 6},
    "no-memory-pattern": {"memory_pattern": False},
    "arena-as-requested": {"cuda_extra": AS_REQUESTED},
    "both": {"memory_pattern": False, "cuda_extra": AS_REQUESTED},
    "transposes-kept": {"reshape_transposes": False},  # size-1 Transposes run as copies (before 2026-12-04)
    "plain-norms": {"zero_skip_norms": False},  # one-row RMSNorms as SimplifiedLayerNormalization (before 2026-12-04)
}
