"""hybrid(distributed=True) end to end: gradient accumulation, state_dict, checkpoints that
change world size (torch_impl/sharding/optimizer_checkpoint.py), consolidation.

Every comparison here is bit for bit: gradients are exact (see each case), DistMuon and
DistAdamW then do the single-device arithmetic (test_sharded_equals_single_device.py), and a
restored state is the saved state. References run inside the ranks (1 BLAS thread, like
the distributed run) rather than in pytest's process."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.dist.common import exact_randn
from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import hybrid
from torch_impl.sharding.optimizer_checkpoint import consolidated_state, load_optimizer, read_meta, save_optimizer

F32, BF16 = torch.float32, torch.bfloat16

# -- gradient accumulation ------------------------------------------------------------------
# A two-layer linear model on dyadic data: inputs in {-1, 0, 1}, weights in multiples of 1/8
# with |w| ≤ 1/4, integer targets, batch and output sizes powers of two. Every product and
# partial sum of the forward and backward pass is then a dyadic rational with < 24
# significant bits, so gradients are exact whatever the summation order or split, and
# "k micro-batches on each of N ranks, averaged" must equal "one batch" bit for bit.
B, D_IN, D_H, D_OUT = 32, 16, 32, 64


def dyadic(shape, *key):
    g = torch.Generator().manual_seed(hash(key) % 2**62)
    return torch.randint(-2, 3, shape, generator=g).float() / 8


def accumulation_model():
    return {
        "transformer.h.0.mlp.c_fc.weight": torch.nn.Parameter(dyadic((D_H, D_IN), 1)),  # Muon
        "transformer.h.0.mlp.c_fc.bias": torch.nn.Parameter(dyadic((D_H,), 2)),         # AdamW, replicated
        "lm_head.weight": torch.nn.Parameter(dyadic((D_OUT, D_H), 3)),                  # AdamW, sharded
    }


def forward(m, x):
    h = x @ m["transformer.h.0.mlp.c_fc.weight"].T + m["transformer.h.0.mlp.c_fc.bias"]
    return h @ m["lm_head.weight"].T


def case_accumulation(k):
    n, r = world_size(), rank()
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-1, 2, (B, D_IN), generator=g).float()
    y = torch.randint(-2, 3, (B, D_OUT), generator=g).float()
    kw = dict(ns_dtype=F32, normuon_beta2=0.95, weight_decay=0.1, adam_weight_decay=0.01)

    m = accumulation_model()
    opt = hybrid(m.items(), distributed=True, **kw)
    xs, ys = x.chunk(n)[r].chunk(k), y.chunk(n)[r].chunk(k)
    for xb, yb in zip(xs, ys):  # what the training loop does: mean loss / k, summed grads
        (F.mse_loss(forward(m, xb), yb) / k).backward()
    local_grads = {name: p.grad.clone() for name, p in m.items()}
    assert opt.step()

    ref = accumulation_model()
    ref_opt = hybrid(ref.items(), distributed=False, **kw)
    F.mse_loss(forward(ref, x), y).backward()
    # precondition (exact data): the ranks' averaged accumulated grads are the batch grads
    for name, p in ref.items():
        avg = local_grads[name].clone()
        torch.distributed.all_reduce(avg, op=torch.distributed.ReduceOp.AVG)
        all_ranks_agree(torch.equal(avg, p.grad), f"accumulated gradient of {name} is not exact")
    ref_opt.step()
    all_ranks_agree(all(torch.equal(m[nm], ref[nm]) for nm in m), "accumulated step != batch step")


@pytest.mark.parametrize("n,k", [(1, 4), (2, 4), (4, 2)])
def test_gradient_accumulation_invariance(rank_groups, n, k):
    rank_groups(n).run(case_accumulation, k)


# -- checkpoints --------------------------------------------------------------------------
SPECS = {
    "transformer.h.0.attn.c_q.weight": ((16, 16), F32),
    "transformer.h.0.attn.c_k.weight": ((16, 16), F32),
    "transformer.h.1.attn.c_q.weight": ((16, 16), F32),
    "transformer.h.0.mlp.c_fc.weight": ((32, 16), F32),
    "transformer.h.1.mlp.c_fc.weight": ((32, 16), BF16),
    "transformer.h.0.mlp.c_proj.weight": ((16, 32), F32),
    "transformer.wte.weight": ((40, 32), F32),        # AdamW, sharded 40 rows
    "lm_head.weight": ((3, 512), BF16),                # AdamW, sharded, 3 rows < 4 ranks
    "transformer.h.0.attn.gain": ((16,), F32),        # AdamW, replicated
    "resid_lambdas": ((4,), F32),
}
KW = dict(ns_dtype=F32, normuon_beta2=0.95, weight_decay=0.05, cautious_weight_decay=True,
          adam_weight_decay=0.01)


def ckpt_model():
    return {name: torch.nn.Parameter(exact_randn(shape, 11, i, dtype=dt))
            for i, (name, (shape, dt)) in enumerate(SPECS.items())}


def train(model, opt, steps):
    """Steps `steps` (a range) with exact gradients and a schedule, as the loop would."""
    for t in steps:
        for i, p in enumerate(model.values()):
            p.grad = exact_randn(p.shape, 13, t, i, dtype=p.dtype)
        opt.set_lr_multiplier(1.0 - 0.1 * t)
        opt.set_muon_momentum(0.85 + 0.02 * t)
        assert opt.step()
        opt.zero_grad()


def reference(total_steps):
    model = ckpt_model()
    opt = hybrid(model.items(), distributed=False, **KW)
    train(model, opt, range(total_steps))
    return model, opt


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def case_save(path, steps):
    model = ckpt_model()
    opt = hybrid(model.items(), distributed=True, **KW)
    train(model, opt, range(steps))
    save_optimizer(opt, path + "/opt")
    if rank() == 0:
        torch.save({k: v.detach() for k, v in model.items()}, path + "/model.pt")
    full = consolidated_state(opt)
    _, ref_opt = reference(steps)
    ref_full = consolidated_state(ref_opt)
    all_ranks_agree(rank() != 0 or same_state(full, ref_full), "consolidated state != single-device state")
    return sorted(full) if rank() == 0 else None


def case_resume(path, start, total):
    saved = torch.load(path + "/model.pt")
    model = {k: torch.nn.Parameter(v.clone()) for k, v in saved.items()}
    opt = hybrid(model.items(), distributed=True, **KW)
    load_optimizer(opt, path + "/opt")
    meta = read_meta(path + "/opt")
    lr_ok = all(g["lr"] == s["hyper"]["lr"] for g, s in zip(opt.optimizers["muon"].param_groups,
                                                            meta["parts"]["muon"]["groups"]))
    train(model, opt, range(start, total))
    ref_model, ref_opt = reference(total)
    ok = lr_ok and all(torch.equal(model[k], ref_model[k]) for k in model)
    full, ref_full = consolidated_state(opt), consolidated_state(ref_opt)
    ok &= rank() != 0 or same_state(full, ref_full)
    all_ranks_agree(ok, f"resumed run != uninterrupted run (lr restored: {lr_ok})")


def test_checkpoint_reshard_4_to_2_and_1(rank_groups, tmp_path):
    path = str(tmp_path)
    keys = rank_groups(4).run(case_save, path, 2)[0]
    assert "muon.0.transformer.h.1.mlp.c_fc.weight.momentum_buffer" in keys
    assert "adamw.0.transformer.wte.weight.exp_avg" in keys
    for n in (2, 1):
        rank_groups(n).run(case_resume, path, 2, 4)
    case_resume(path, 2, 4)  # and in pytest's process, without any process group
    meta = json.loads((tmp_path / "opt" / "meta.json").read_text())
    assert meta["world_size"] == 4
    assert not (tmp_path / "opt.tmp").exists()


def test_checkpoint_1_to_3(rank_groups, tmp_path):
    """Saved without a process group (plain optimizers), resumed sharded over 3 ranks."""
    path = str(tmp_path)
    model, opt = reference(2)
    save_optimizer(opt, path + "/opt")
    torch.save({k: v.detach() for k, v in model.items()}, path + "/model.pt")
    rank_groups(3).run(case_resume, path, 2, 3)


def case_state_dict_roundtrip():
    """state_dict()/load_state_dict() at the same world size (each rank its own shard)."""
    model = ckpt_model()
    opt = hybrid(model.items(), distributed=True, **KW)
    train(model, opt, range(2))
    sd = opt.state_dict()
    model2 = {k: torch.nn.Parameter(v.detach().clone()) for k, v in model.items()}
    opt2 = hybrid(model2.items(), distributed=True, **KW)
    opt2.load_state_dict(sd)
    dtypes_ok = all(v.dtype == torch.float32 for o in opt2.optimizers.values()
                    for s in o.state.values() for k, v in s.items() if k != "step")
    train(model, opt, range(2, 4))
    train(model2, opt2, range(2, 4))
    all_ranks_agree(dtypes_ok and all(torch.equal(model[k], model2[k]) for k in model),
                    f"state_dict round trip diverged (fp32 state kept: {dtypes_ok})")


@pytest.mark.parametrize("n", [2])
def test_state_dict_roundtrip_same_world_size(rank_groups, n):
    rank_groups(n).run(case_state_dict_roundtrip)


def test_save_is_atomic_and_replaces(tmp_path):
    model, opt = reference(1)
    save_optimizer(opt, tmp_path / "opt")
    train(model, opt, range(1, 2))
    save_optimizer(opt, tmp_path / "opt")  # replaces the old checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]
    assert read_meta(tmp_path / "opt")["parts"]["muon"]["groups"][0]["hyper"]["lr"] == pytest.approx(0.02 * 0.9)
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete"):
        load_optimizer(opt, tmp_path / "half")
    other = hybrid({"transformer.h.0.x.weight": torch.nn.Parameter(torch.zeros(4, 4))}.items(), **KW)
    with pytest.raises(ValueError, match="parts|parameters differ"):
        load_optimizer(other, tmp_path / "opt")


# -- replicas stay identical --------------------------------------------------------------
# A torn or stale all_gather (an input buffer reused or freed before the collective read it,
# a rank that keeps its old values) leaves ranks with different weights without any error;
# nanochat's distributed optimizer had such a report. After every step of a run with
# different gradients per rank, a checksum of every parameter's bits must be equal on all
# ranks, while tensors are allocated, filled with NaN and freed between each collective's
# launch and its wait (allocator churn: a buffer freed too early gets reused by them).
# What this can catch on gloo/CPU: a stale replica, or a send buffer reused or written before
# its wait (gloo's Work keeps its tensors alive, so a plain early free cannot tear a CPU
# all_gather; on CUDA the caching allocator could, and the test is device-generic). The planted
# bug "non-owners keep their stale matrices" (parity_tests/mutants.py) makes it fail.

class ChurnBeforeWait:
    def __init__(self, work, sizes):
        self.work, self.sizes = work, sizes

    def wait(self):
        junk = [torch.full((n,), float("nan")) for n in self.sizes for _ in range(2)]
        del junk
        return self.work.wait()


def churn_between_launch_and_wait(comm) -> None:
    for name in ("reduce_scatter", "all_gather", "all_reduce"):
        launch = getattr(comm, name)

        def launched(*tensors, _launch=launch, **kw):
            return ChurnBeforeWait(_launch(*tensors, **kw), [t.numel() for t in tensors])
        setattr(comm, name, launched)


def bits_checksum(params) -> torch.Tensor:
    """Position-weighted sum of the raw bits of every element (int64, wraps): any changed
    element or permutation changes it."""
    ints = {2: torch.int16, 4: torch.int32}
    bits = torch.cat([p.detach().reshape(-1).view(ints[p.element_size()]).long() for p in params])
    weights = torch.arange(bits.numel(), dtype=torch.int64) % 65521 + 1
    return (bits * weights).sum().reshape(1)


def case_replicas_identical_under_churn(steps):
    n, r = world_size(), rank()
    model = ckpt_model()
    opt = hybrid(model.items(), distributed=True, **KW)
    for part in opt.optimizers.values():
        churn_between_launch_and_wait(part.comm)
    for t in range(steps):
        for i, p in enumerate(model.values()):
            p.grad = exact_randn(p.shape, 17, t, i, r, dtype=p.dtype)  # different data per rank
        assert opt.step()
        opt.zero_grad()
        sums = torch.empty(n, dtype=torch.int64)
        torch.distributed.all_gather_into_tensor(sums, bits_checksum(model.values()))
        all_ranks_agree(len(set(sums.tolist())) == 1, f"step {t}: parameters differ across ranks: {sums.tolist()}")


@pytest.mark.parametrize("n", [2, 3])
def test_replicas_bit_identical_after_every_step_under_allocator_churn(rank_groups, n):
    rank_groups(n).run(case_replicas_identical_under_churn, 4)
