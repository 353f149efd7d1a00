"""Flag values, generated: sampling's --temperature/--top-k/--top-p (any float, NaN and subnormals included)
and lower's --shape (any text) either work or are one UserError, never another exception."""

from __future__ import annotations

import numpy as np
import pytest
from dsv3c.cli.cmd_lower import parse_dims
from dsv3c.errors import UserError
from dsv3c.runtime.sampling import Sampler, SamplingConfig
from hypothesis import given, settings
from hypothesis import strategies as st

VOCAB = 64


@settings(max_examples=300, deadline=None)
@given(
    temperature=st.floats() | st.sampled_from([5e-324, 1e-310, 1e-300, 1e300]),
    top_k=st.integers(-3, 2 * VOCAB),
    top_p=st.floats(),
    seed=st.integers(-3, 2**70),
    scale=st.floats(1e-3, 1e4),
)
def test_sampling_flags_give_a_token_or_one_user_error(
    temperature: float, top_k: int, top_p: float, seed: int, scale: float
) -> None:
    try:
        config = SamplingConfig(temperature, top_k, top_p, seed)
    except UserError as e:
        assert "\n" not in str(e)
        return
    logits = (np.random.default_rng(seed).standard_normal((3, VOCAB)) * scale).astype(np.float32)
    ids = Sampler(config)(logits)
    assert ids.shape == (3,) and ((ids >= 0) & (ids < VOCAB)).all()


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(
        st.text(max_size=12)
        | st.tuples(st.sampled_from(["batch", "seq", " q", ""]), st.integers(-5, 2**70)).map(
            lambda t: f"{t[0]}={t[1]}"
        ),
        max_size=3,
    )
)
def test_shape_flags_give_dims_or_one_user_error(items: list[str]) -> None:
    try:
        dims = parse_dims(items)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert all(1 <= n < 2**63 for n in dims.values())


# ---- regression tests: each failed before its fix ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_a_temperature_that_is_not_a_number_is_refused(temperature: float) -> None:
    """Found by probing the flags: --temperature nan reached numpy, which raised 'Probabilities contain NaN'."""
    with pytest.raises(UserError, match="--temperature must be a number >= 0"):
        SamplingConfig(temperature)


def test_a_tiny_temperature_samples_the_argmax() -> None:
    """Found by the sampling property test: logits / 5e-324 overflowed to inf, inf - inf gave NaN probabilities."""
    logits = np.random.default_rng(0).standard_normal((4, VOCAB)).astype(np.float32)
    assert np.array_equal(Sampler(SamplingConfig(5e-324, seed=1))(logits), logits.argmax(-1))


def test_a_shape_past_int64_is_refused() -> None:
    """Found by probing the flags: --shape batch=99999999999999999999 raised OverflowError in a pass."""
    with pytest.raises(UserError, match="1 <= N < 2\\^63"):
        parse_dims(["batch=99999999999999999999"])
    assert parse_dims(["batch=9223372036854775807"]) == {"batch": 2**63 - 1}


@settings(max_examples=200, deadline=None)
@given(lr=st.floats(), gamma=st.floats(), alpha=st.floats(), mtp=st.floats())
def test_training_rates_are_finite_or_one_user_error(lr: float, gamma: float, alpha: float, mtp: float) -> None:
    from dsv3c.train.config import TrainConfig

    config = TrainConfig(lr=lr, bias_gamma=gamma, balance_alpha=alpha, mtp_lambda=mtp)
    try:
        config.check()
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert all(np.isfinite([lr, gamma, alpha, mtp])) and lr > 0 and min(gamma, alpha, mtp) >= 0


@pytest.mark.parametrize("flag", ["lr", "bias_gamma", "balance_alpha", "mtp_lambda"])
def test_an_infinite_training_rate_is_refused(flag: str) -> None:
    """Found by probing the flags: --lr inf (and --gamma, --alpha, --mtp-lambda inf) passed the check; with
    --lr inf, AdamW's first step makes every later loss NaN."""
    from dsv3c.train.config import TrainConfig

    with pytest.raises(UserError, match="finite"):
        TrainConfig(**{flag: float("inf")}).check()


@pytest.mark.parametrize("argv", [["quantize", "x", "--out", "y"], ["diff", "a", "b", "--numeric"]])
def test_a_negative_seed_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Found by probing the flags: --seed -1 reached numpy's default_rng, which raised ValueError (diff --numeric,
    quantize --report, generate --temperature)."""
    from dsv3c.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main.main([*argv, "--seed", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "expected a seed >= 0" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="--seed must be >= 0"):
        SamplingConfig(1.0, seed=-1)


@settings(max_examples=200, deadline=None)
@given(text=st.integers(-(2**70), 2**70).map(str) | st.text(max_size=12))
def test_calibration_batches_are_bounded_or_one_usage_error(text: str) -> None:
    import argparse

    from dsv3c.cli.args import MAX_CALIBRATION_BATCHES, calibration_batches

    try:
        assert 0 <= calibration_batches(text) <= MAX_CALIBRATION_BATCHES
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e) and len(str(e)) < 200


@pytest.mark.parametrize("n", ["1025", str(10**22), "-1"])
def test_a_calibration_past_the_bound_is_one_line(n: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by reading the flag checks: any N >= 0 was accepted, and calibration runs every graph on each of N
    batches (with random ids nothing else bounds N), so --calibrate 10**22 would never end. Refused now, before
    any work."""
    from dsv3c.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main.main(["quantize", "x", "--out", "y", "--calibrate", n])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "from 1 to 1024" in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_the_largest_calibration_is_accepted() -> None:
    from dsv3c.cli.main import build_parser

    args = build_parser().parse_args(["quantize", "x", "--out", "y", "--calibrate", "1024"])
    assert args.calibrate == 1024
