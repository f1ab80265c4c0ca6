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
