"""The planted bugs the parity suite must catch (see mutation.py)."""

from parity_tests.mutation import Mutant

ORTH = "torch_impl/orthogonalize.py"
ORTH_TESTS = ("parity_tests/test_orthogonalize_parity.py",)
ORTH_SELECT = "fp32_both_frameworks"

MUTANTS = [
    Mutant("ns: wrong sign of coefficient b", ORTH,
           "B = torch.baddbmm(A, A, A, beta=b, alpha=c)",
           "B = torch.baddbmm(A, A, A, beta=-b, alpha=c)", ORTH_TESTS, ORTH_SELECT),
    Mutant("ns: tall matrices not transposed back", ORTH,
           "    if transposed:\n        X = X.mT\n    return",
           "    return", ORTH_TESTS, ORTH_SELECT),
    Mutant("ns: missing Frobenius normalisation", ORTH,
           "X = (X / (frobenius_norm(X) * norm_scale + eps)).to(compute_dtype)",
           "X = X.to(compute_dtype)", ORTH_TESTS, ORTH_SELECT),
]
