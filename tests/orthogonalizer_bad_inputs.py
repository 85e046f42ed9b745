"""Bad inputs every orthogonalizer must reject with a ValueError whose message matches, as numpy
arrays so that both frameworks' unit tests (tests/torch_impl, tests/jax_reference) share them."""

import numpy as np

BAD_INPUTS = {
    "integer dtype": (np.ones((4, 4), np.int32), "floating"),
    "one dimension": (np.ones((4,), np.float32), "rows, cols|ndim"),
    "empty matrix": (np.ones((0, 4), np.float32), "empty"),
    "nan": (np.full((4, 4), np.nan, np.float32), "NaN|nan|finite"),
    "inf": (np.full((4, 4), np.inf, np.float32), "NaN|nan|finite|inf"),
}
