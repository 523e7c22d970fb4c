"""ParallelDims: the one check of the parallel layout, with the whole picture in its error."""

from __future__ import annotations

import pytest

from longtune.parallel.dims import ParallelConfigError, ParallelDims


def test_valid_layouts_resolve_dp():
    assert ParallelDims.build(8, 2, n_heads=32, n_kv_heads=8) == ParallelDims(4, 2, 8)
    assert ParallelDims.build(4, 4, n_heads=32, n_kv_heads=2).dp == 1  # KV heads repeated
    assert ParallelDims.build(6, 3, 2, n_heads=9, n_kv_heads=3).coords(5) == (1, 2)


def test_valid_sp_degrees_follow_heads_and_world():
    # Llama-3.1-8B: 32 query heads, 8 KV heads.
    assert ParallelDims.valid_sp_degrees(16, 32, 8) == [1, 2, 4, 8, 16]
    # SmolLM2-135M: 9 query heads, 3 KV heads.
    assert ParallelDims.valid_sp_degrees(9, 9, 3) == [1, 3, 9]
    assert ParallelDims.valid_sp_degrees(4, 9, 3) == [1]
    # 6 KV heads: sp=4 neither divides them nor is a multiple of them.
    assert ParallelDims.valid_sp_degrees(8, 24, 6) == [1, 2]


@pytest.mark.parametrize(
    ("world", "sp", "dp", "heads", "kv", "problem"),
    [
        (6, 4, -1, 32, 8, "parallel.sp=4 does not divide the world size 6"),
        (4, 4, -1, 9, 3, "parallel.sp=4 does not divide the 9 query heads"),
        (8, 4, -1, 24, 6, "neither divides the 6 KV heads"),
        (8, 2, 3, 32, 8, "parallel.dp=3 x parallel.sp=2 = 6 is not the world size"),
        (4, 0, -1, 32, 8, "parallel.sp=0 does not divide"),
    ],
)
def test_invalid_layouts_name_everything(world, sp, dp, heads, kv, problem):
    with pytest.raises(ParallelConfigError) as info:
        ParallelDims.build(world, sp, dp, n_heads=heads, n_kv_heads=kv)
    msg = str(info.value)
    assert problem in msg
    assert f"world size {world}, parallel.sp={sp}, parallel.dp={dp}" in msg
    assert f"{heads} query heads and {kv} KV heads" in msg
    valid = ", ".join(map(str, ParallelDims.valid_sp_degrees(world, heads, kv)))
    assert f"Valid parallel.sp on {world} ranks for this model: {valid};" in msg
