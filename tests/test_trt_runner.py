"""The engine runner: greedy generation through TensorRT engines equals onnxruntime on the same export.

Engines execute only on a GPU TensorRT supports (TensorRT-RTX: compute capability 8.0, 8.6, 8.9, 12.x; not
9.0). Where there is none, the tests that execute are skipped with the reason; nothing passes without running.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dsv3c.errors import UserError
from dsv3c.runtime.trt.runner import unavailable_reason

REASON = unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=f"engine runner needs a GPU TensorRT runs on: {REASON}")


@pytest.fixture(scope="module")
def engines(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from dsv3c.cli.cmd_build import trt_lowering
    from dsv3c.runtime.trt.build import BuildOptions, build_engines

    major, minor = torch.cuda.get_device_capability()
    out = tmp_path_factory.mktemp("trt-run") / "engines"
    build_engines(tiny_export, out, BuildOptions(target_cc=[f"{major}.{minor}"], lower_for_trt=trt_lowering))
    return out


@needs_gpu
def test_greedy_generation_matches_onnxruntime(engines: Path, tiny_export: Path) -> None:
    from dsv3c.runtime.generate import generate
    from dsv3c.runtime.ort_backend import OrtBackend
    from dsv3c.runtime.trt.runner import TrtBackend

    prompts = [[5, 17, 42, 9], [3, 8]]
    want = generate(OrtBackend(tiny_export), prompts, max_new_tokens=8)
    assert generate(TrtBackend(engines), prompts, max_new_tokens=8) == want


@needs_gpu
def test_cache_is_carried_between_decode_steps(engines: Path) -> None:
    """Prefill 3 tokens then decode 3 one at a time == prefill of all 6 (last logits), through the latent cache."""
    import torch
    from dsv3c.runtime.trt.runner import TrtEngine

    engine = TrtEngine(engines)
    ids = torch.tensor([[5, 17, 42, 9, 11, 30]], device="cuda")
    positions = torch.arange(6, device="cuda")[None]
    engine.start(1, 16)
    whole = engine.prefill(ids, positions).logits[:, -1]
    engine.start(1, 16)
    engine.prefill(ids[:, :3], positions[:, :3])
    for t in range(3, 6):
        step = engine.decode(ids[:, t : t + 1], positions[:, t : t + 1]).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=2e-3, atol=2e-3)


def test_no_supported_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if REASON is None:
        pytest.skip("a GPU TensorRT runs on is present: the runner tests above ran instead")
    from dsv3c.runtime.trt.runner import TrtEngine

    with pytest.raises(UserError) as e:
        TrtEngine(tmp_path)  # refused before the folder is read
    assert str(e.value) == REASON and ("GPU" in REASON or "TensorRT" in REASON)
