"""Shared helpers: group means without a float64 copy of the matrix."""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from pertpy_gnn._utils import group_means


@pytest.mark.parametrize("sparse", [False, True])
def test_group_means_equal_float64_reference_without_float64_copy(sparse):
    rng = np.random.default_rng(0)
    x = (rng.random((3000, 400)) * (rng.random((3000, 400)) < 0.4)).astype(np.float32)
    codes = rng.integers(-1, 7, 3000)
    codes[codes == 5] = -1  # an empty group: NaN
    matrix = sp.csr_matrix(x) if sparse else x
    expected = np.full((7, 400), np.nan)
    for g in range(7):
        if (codes == g).any():
            expected[g] = x[codes == g].astype(np.float64).mean(0)
    tracemalloc.start()
    means = group_means(matrix, codes, 7, chunk_elements=10_000)  # many blocks of rows
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert means.dtype == np.float32
    np.testing.assert_allclose(means, expected, rtol=1e-6)
    # a float64 copy of x (or of its stored values) alone would take this much
    assert peak < 0.25 * (x.size if not sparse else matrix.nnz) * 8


def test_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    import resource

    from pertpy_gnn import _malloc

    if _malloc._glibc() is None:
        with _malloc.keep_freed_memory() as active:
            assert active is False  # a no-op off glibc
        pytest.skip("glibc only")

    def faults_of_a_step() -> int:  # four 24 MiB activations, freed together as at the end of a step
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [np.ones(6 * 2**20, dtype=np.float32) for _ in range(4)]
        del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with _malloc.keep_freed_memory() as active:
        assert active is True
        with _malloc.keep_freed_memory() as nested:
            assert nested is False  # the outer settings stay
        faults_of_a_step()  # the heap grows once
        kept = min(faults_of_a_step() for _ in range(3))
    # glibc's defaults trim the freed top of the heap: about 2,000 faults each time in a fresh process
    assert kept < 200
    with _malloc.keep_freed_memory(enabled=False) as active:
        assert active is False


def test_group_sums_in_sub_blocks_equal_numpy(monkeypatch):
    """Sparse rows added a few at a time (sub-blocks within blocks), with empty and ignored rows and int64 indices."""
    from pertpy_gnn import _utils

    rng = np.random.default_rng(3)
    x = (rng.random((500, 30)) * (rng.random((500, 30)) < 0.3)).astype(np.float32)
    x[10:20] = 0.0  # empty rows
    codes = rng.integers(-1, 6, 500)
    monkeypatch.setattr(_utils, "_SUB_BLOCK", 40)  # a few rows per sub-block
    matrix = sp.csr_matrix(x)
    wide = sp.csr_matrix(
        (matrix.data, matrix.indices.astype(np.int64), matrix.indptr.astype(np.int64)), x.shape
    )
    for m in (matrix, wide, x):
        n, s1, s2 = _utils.group_sums(m, codes, 6, squares=True, chunk_elements=900)
        for g in range(6):
            rows = x[codes == g].astype(np.float64)
            assert n[g] == rows.shape[0]
            np.testing.assert_allclose(s1[g], rows.sum(0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(s2[g], (rows**2).sum(0), rtol=1e-12, atol=1e-12)
    assert _utils.group_sums(matrix, codes, 6)[2] is None
