"""reshape_of, generated: a shape (with dimensions of size 1) and a permutation give a Reshape target exactly
when the transpose leaves the elements in the order they were, and that Reshape gives the transpose."""

from __future__ import annotations

import numpy as np
from dsv3c.onnxkit.static_transposes import reshape_of
from hypothesis import given, settings
from hypothesis import strategies as st


@st.composite
def shapes_and_perms(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    sizes = draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=1, max_size=5))
    return sizes, draw(st.permutations(range(len(sizes))))


@settings(max_examples=400, deadline=None)
@given(shapes_and_perms())
def test_a_target_exactly_when_the_transpose_moves_nothing(case: tuple[list[int], list[int]]) -> None:
    sizes, perm = case
    x = np.arange(int(np.prod(sizes))).reshape(sizes)
    transposed = np.transpose(x, perm)
    target = reshape_of(sizes, perm)
    assert (target is not None) == bool((transposed.ravel() == x.ravel()).all())
    if target is not None:
        assert (x.reshape(target) == transposed).all()
