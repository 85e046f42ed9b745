"""The planted bugs the parity suite must catch (see mutation.py)."""

from parity_tests.mutation import Mutant

ORTH = "torch_impl/orthogonalizers/newton_schulz.py"
ORTH_TESTS = ("parity_tests/test_orthogonalize_parity.py",)
ORTH_SELECT = "fp32_both_frameworks"

MUTANTS = [
    Mutant("ns: wrong sign of coefficient b", ORTH,
           "return torch.baddbmm(A, A, A.mT, beta=b, alpha=c)",
           "return torch.baddbmm(A, A, A.mT, beta=-b, alpha=c)", ORTH_TESTS, ORTH_SELECT),
    Mutant("ns: tall matrices not transposed back", ORTH,
           "    if m > n:\n        X = X.mT\n    return",
           "    return", ORTH_TESTS, ORTH_SELECT),
    Mutant("ns: missing Frobenius normalisation", ORTH,
           "return (X / (frobenius_norm(X) * norm_scale + eps)).to(compute_dtype)",
           "return X.to(compute_dtype)", ORTH_TESTS, ORTH_SELECT),
]

MUON = "torch_impl/optim/muon.py"
BALANCE = "torch_impl/orthogonalizers/balance.py"
MUON_TESTS = ("parity_tests/test_muon_parity.py",)
MUON_SELECT = "trajectory_torch_equals_jax"

MUTANTS += [
    Mutant("muon: lr applied twice (lr*lr)", MUON,
           "params.add_(O, alpha=-hp.lr * shape_scale(rows, cols, hp.shape_scale))",
           "params.add_(O, alpha=-hp.lr * hp.lr * shape_scale(rows, cols, hp.shape_scale))",
           MUON_TESTS, MUON_SELECT),
    Mutant("muon: nesterov lerp in the wrong direction", MUON,
           "update = grads.lerp(momentum_buf, hp.momentum) if hp.nesterov else momentum_buf",
           "update = momentum_buf.lerp(grads, hp.momentum) if hp.nesterov else momentum_buf",
           MUON_TESTS, MUON_SELECT),
    Mutant("muon: weight decay applied after the update", MUON,
           "    if hp.weight_decay != 0:\n        decay = hp.lr * hp.weight_decay\n",
           "    params.add_(O, alpha=-hp.lr * shape_scale(rows, cols, hp.shape_scale))\n"
           "    O = torch.zeros_like(O)\n"
           "    if hp.weight_decay != 0:\n        decay = hp.lr * hp.weight_decay\n",
           MUON_TESTS, MUON_SELECT),
    Mutant("muon: shape scale rule inverted", MUON,
           "return max(1.0, rows / cols) ** 0.5", "return max(1.0, cols / rows) ** 0.5",
           MUON_TESTS, MUON_SELECT),
    Mutant("muon: cautious mask sign flipped", MUON,
           "params.sub_(params * (O * params >= 0), alpha=decay)",
           "params.sub_(params * (O * params <= 0), alpha=decay)",
           MUON_TESTS, MUON_SELECT),
]

# Distributed planted bugs: caught by the multi-rank tests in tests/dist (gloo, spawned ranks).
# test_sharded_equals_single_device.py is one table (a row per optimizer kind); its ids end in
# [muon-N<n>] / [adamw-N<n>], so -k picks a row.
DIST_MUON_TESTS = DIST_ADAMW_TESTS = ("tests/dist/test_sharded_equals_single_device.py",)
DIST_MUON_SELECT = "identical_data_bitwise and muon and not thorough"
DIST_ADAMW_SELECT = "identical_data_bitwise and adamw and not thorough"
DIST_HYBRID_TESTS = ("tests/dist/test_dist_hybrid.py",)

MUTANTS += [
    Mutant("dist: gradients summed over ranks, not averaged", "torch_impl/sharding/comm.py",
           "def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.AVG):",
           "def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op=dist.ReduceOp.SUM):",
           DIST_MUON_TESTS, DIST_MUON_SELECT),
    Mutant("dist: matrix owners disagree with the buffer layout", "torch_impl/sharding/placement.py",
           "placements[stack[i]] = Owned(r) if world_size > 1 else Replicated()",
           "placements[stack[i]] = Owned(i % world_size) if world_size > 1 else Replicated()",
           # the edge cases hold a 5-matrix stack, whose contiguous runs differ from i % N
           DIST_MUON_TESTS, "edge_shapes and muon"),
    Mutant("dist: AdamW rows gathered at the wrong offset", "torch_impl/optim/adamw.py",
           "p.copy_(out[:p.shape[0]])", "p.copy_(out[-p.shape[0]:])",
           DIST_ADAMW_TESTS, DIST_ADAMW_SELECT),
    Mutant("fsdp2: AdamW steps the first rows of the gradient, not this rank's", "torch_impl/optim/adamw.py",
           "[p.grad.to_local() for p in mine], group)",
           "[p.grad.full_tensor()[:p.to_local().shape[0]] for p in mine], group)",
           ("tests/dist/test_fsdp2.py",), "adamw_on_fsdp2"),
    Mutant("fsdp2: Muon sends every rank the first rows of the direction, not its own",
           "torch_impl/sharding/row_owners.py",
           "send = torch.cat([results[:, start:end].reshape(-1) for start, end in self.bounds])",
           "send = torch.cat([results[:, :end - start].reshape(-1) for start, end in self.bounds])",
           ("tests/dist/test_fsdp2.py",), "muon_on_fsdp2 and plain"),
    Mutant("fsdp2: Muon applies the direction to a copy, the parameter keeps its rows", "torch_impl/optim/muon.py",
           "t.copy_(new.view_as(t))", "t.clone().copy_(new.view_as(t))",
           ("tests/dist/test_fsdp2.py",), "muon_on_fsdp2 and plain"),
    Mutant("zero2 hooks: gradients dropped before their bucket is packed", "torch_impl/sharding/backward_reduce.py",
           "            reduction = self.launch(b)\n",
           "            for q in params:\n                q.grad = None\n"
           "            reduction = self.launch(b)\n",
           ("tests/dist/test_backward_reduce.py",), "equals_reduce_in_step"),
    Mutant("zero2 hooks: full gradients kept after their bucket is sent", "torch_impl/sharding/backward_reduce.py",
           "                q.grad = None", "                pass",
           ("tests/dist/test_backward_reduce.py",), "equals_reduce_in_step"),
    Mutant("dist: non-owners keep their stale matrices", "torch_impl/optim/muon.py",
           "p.copy_(out[slot].view_as(p))",
           "p.copy_(out[slot].view_as(p)) if self.placement(p).holds(rank) else None",
           DIST_HYBRID_TESTS, "churn"),
]

# The orthogonalizer zoo and the MuonEq / Muon+ options (issue 11).
ZOO_TESTS = ("parity_tests/test_orthogonalizer_zoo_parity.py",)
ZOO_SELECT = "fp32_both_frameworks"
ZOO_MUON_SELECT = "variant_trajectory"

MUTANTS += [
    Mutant("gram ns: Q multiplied by R instead of Z", "torch_impl/orthogonalizers/gram_newton_schulz.py",
           "Q = torch.baddbmm(Q, Q, Z, beta=a, alpha=1.0)",
           "Q = torch.baddbmm(Q, Q, R, beta=a, alpha=1.0)", ZOO_TESTS, ZOO_SELECT),
    Mutant("aol: Gram matrix rescaled on one side only", "torch_impl/orthogonalizers/aol.py",
           "A = (d.unsqueeze(-1) * A.to(acc) * d.unsqueeze(-2)).to(compute_dtype)",
           "A = (d.unsqueeze(-1) * A.to(acc)).to(compute_dtype)", ZOO_TESTS, ZOO_SELECT),
    Mutant("cubic: a and b swapped", "torch_impl/orthogonalizers/schedules.py",
           "X = torch.baddbmm(X, A.mT, X, beta=a, alpha=b)",
           "X = torch.baddbmm(X, A.mT, X, beta=b, alpha=a)", ZOO_TESTS, ZOO_SELECT),
    Mutant("muoneq: columns equilibrated instead of rows", BALANCE,
           "row_norm = X.square().sum(dim=-1, keepdim=True).sqrt().clamp_min(ROW_EQUILIBRATION_EPS)",
           "row_norm = X.square().sum(dim=-2, keepdim=True).sqrt().clamp_min(ROW_EQUILIBRATION_EPS)",
           ZOO_TESTS, ZOO_MUON_SELECT),
    Mutant("muon+: renormalized to sqrt(max(rows, cols))", BALANCE,
           "return O * (math.sqrt(min(O.shape[-2:]))",
           "return O * (math.sqrt(max(O.shape[-2:]))", ZOO_TESTS, ZOO_MUON_SELECT),
]
