"""Failures must raise on every rank (or skip on every rank), never hang.

Each case ends with a collective (`all_ranks_agree`): if one rank had raised alone or run
ahead, the group would be out of step and the case would time out instead of passing."""

from __future__ import annotations

import pytest
import torch

from tests.dist.common import exact_randn
from tests.dist.harness import all_ranks_agree, rank
from torch_impl.optim import DistAdamW, DistMuon, hybrid
from torch_impl.optim.nonfinite import NonFiniteGradientError


def named_model():
    return {
        "transformer.h.0.attn.c_q.weight": torch.nn.Parameter(exact_randn((8, 8), 1)),
        "transformer.h.0.mlp.c_fc.weight": torch.nn.Parameter(exact_randn((16, 8), 2)),
        "transformer.wte.weight": torch.nn.Parameter(exact_randn((64, 32), 3)),
        "transformer.h.0.attn.gain": torch.nn.Parameter(exact_randn((8,), 4)),
    }


def set_grads(model, bad_name=None, bad_rank=None):
    for i, (name, p) in enumerate(model.items()):
        p.grad = exact_randn(p.shape, 9, i)
        if name == bad_name and rank() == bad_rank:
            p.grad.view(-1)[0] = float("nan") if p.grad.ndim > 1 else float("inf")


def raises_everywhere(fn, exc, match: str) -> None:
    try:
        fn()
    except exc as e:
        all_ranks_agree(match in str(e), f"wrong message: {e}")
        return
    all_ranks_agree(False, f"{fn} did not raise {exc.__name__} on this rank")


def case_nonfinite_one_rank():
    for bad in ("transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight", "transformer.h.0.attn.gain"):
        model = named_model()
        before = {k: v.detach().clone() for k, v in model.items()}
        opt = hybrid(model.items(), distributed=True, ns_dtype=torch.float32)
        set_grads(model, bad, bad_rank=1)
        raises_everywhere(opt.step, NonFiniteGradientError, bad)
        all_ranks_agree(all(torch.equal(model[k], before[k]) for k in model), "params changed")
        # "skip": every rank skips; the optimizers alone (check_finite=True) behave the same
        opt = hybrid(model.items(), distributed=True, ns_dtype=torch.float32, nonfinite="skip")
        all_ranks_agree(opt.step() is False, "skip policy did not skip on every rank")
        for o in opt.optimizers.values():
            o.nonfinite = "raise"
            if any(model[bad] is p for g in o.param_groups for p in g["params"]):
                raises_everywhere(o.step, NonFiniteGradientError, bad)
        all_ranks_agree(all(torch.equal(model[k], before[k]) for k in model), "params changed")


@pytest.mark.parametrize("n", [2, 3])
def test_nonfinite_gradient_on_one_rank_raises_on_every_rank(rank_groups, n):
    rank_groups(n).run(case_nonfinite_one_rank)


def case_mismatched_params():
    r = rank()
    variants = {
        "extra parameter on rank 1": [torch.zeros(8, 8)] + ([torch.zeros(8, 8)] if r == 1 else []),
        "different shape on rank 1": [torch.zeros(8, 8) if r != 1 else torch.zeros(8, 4)],
        "different dtype on rank 0": [torch.zeros(8, 8, dtype=torch.bfloat16 if r == 0 else torch.float32)],
        "different order": [torch.zeros(8, 8), torch.zeros(4, 8)][::(-1 if r == 1 else 1)],
    }
    for tensors in variants.values():
        for cls in (DistMuon, DistAdamW):
            raises_everywhere(lambda cls=cls, tensors=tensors: cls([torch.nn.Parameter(t) for t in tensors]),
                              ValueError, "differ across ranks")
    # a 1-D parameter on rank 1 only: Muon's own check fails there, the others learn of it
    params = [torch.nn.Parameter(torch.zeros(8) if r == 1 else torch.zeros(8, 8))]
    raises_everywhere(lambda: DistMuon(params), ValueError, "DistMuon" if r != 1 else "≥ 2 dims")
    # parameters on two devices (meta stands in for a second device on a CPU-only machine)
    params = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8, device="meta"))]
    for cls in (DistMuon, DistAdamW):
        raises_everywhere(lambda cls=cls: cls(params), ValueError, "one device")


@pytest.mark.parametrize("n", [2, 3])
def test_mismatched_param_lists_raise_on_every_rank(rank_groups, n):
    rank_groups(n).run(case_mismatched_params)


def case_nonfinite_one_rank_adamw_only():
    """A hybrid with no Muon part (--optimizer adamw): its one check must still be
    the global one, or the bad rank raises alone and the others hang in DistAdamW."""
    model = {k: v for k, v in named_model().items() if not k.startswith("transformer.h.0.")}
    model["transformer.h.0.attn.gain"] = torch.nn.Parameter(exact_randn((8,), 4))
    before = {k: v.detach().clone() for k, v in model.items()}
    opt = hybrid(model.items(), distributed=True, matrix_optimizer="adamw")
    assert list(opt.optimizers) == ["adamw"]
    set_grads(model, "transformer.wte.weight", bad_rank=1)
    raises_everywhere(opt.step, NonFiniteGradientError, "transformer.wte.weight")
    all_ranks_agree(all(torch.equal(model[k], before[k]) for k in model), "params changed")


@pytest.mark.parametrize("n", [2])
def test_nonfinite_on_one_rank_raises_everywhere_without_muon(rank_groups, n):
    rank_groups(n).run(case_nonfinite_one_rank_adamw_only)


def case_grad_on_some_ranks():
    for name in ("transformer.h.0.attn.c_q.weight", "transformer.wte.weight"):
        model = named_model()
        opt = hybrid(model.items(), distributed=True, ns_dtype=torch.float32)
        set_grads(model)
        if rank() == 0:
            model[name].grad = None
        raises_everywhere(opt.step, ValueError, f"present on some ranks but not on others: {name}")
        # the optimizers' own steps (after the hybrid's global check was bypassed) too
        for o in opt.optimizers.values():
            if any(model[name] is p for g in o.param_groups for p in g["params"]):
                raises_everywhere(lambda o=o: o.step(check_finite=False), ValueError, name)


@pytest.mark.parametrize("n", [2])
def test_gradient_on_some_ranks_only_raises_on_every_rank(rank_groups, n):
    rank_groups(n).run(case_grad_on_some_ranks)


def case_construction_mistakes():
    """add_param_group on a sharded optimizer, and a hybrid whose parts use different groups
    (its single check would not cover the sharded part): ValueError on every rank."""
    from torch_impl.optim import AdamW, HybridOptimizer, Muon
    for cls in (DistMuon, DistAdamW):
        opt = cls([torch.nn.Parameter(exact_randn((8, 8), 1))])
        extra = dict(params=[torch.nn.Parameter(exact_randn((8, 8), 2))])
        raises_everywhere(lambda o=opt, g=extra: o.add_param_group(g), ValueError, "build a new optimizer")
    local = Muon([torch.nn.Parameter(exact_randn((8, 8), 3))])
    sharded = DistAdamW([torch.nn.Parameter(exact_randn((8,), 4))])
    raises_everywhere(lambda: HybridOptimizer(local, sharded), ValueError, "different process groups")
    raises_everywhere(lambda: HybridOptimizer(DistMuon([torch.nn.Parameter(exact_randn((8, 8), 5))]),
                                              AdamW([torch.nn.Parameter(exact_randn((8,), 6))])),
                      ValueError, "different process groups")


def test_construction_mistakes_raise_on_every_rank(rank_groups):
    rank_groups(2).run(case_construction_mistakes)


def case_save_fails_on_one_rank(path):
    """A write fails on rank 1 only: the save fails on every rank (CheckpointError), nothing is left."""
    from pathlib import Path

    from torch_impl.data.tokenizer import ByteTokenizer
    from torch_impl.models.gpt import GPT, GPTConfig
    from torch_impl.training import checkpoint
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    opt = hybrid(model.named_parameters(), distributed=True)
    rng_state = checkpoint._rng_state

    def full_disk():
        raise OSError(28, "No space left on device")

    if rank() == 1:  # the pool's workers live on: restored below
        checkpoint._rng_state = full_disk
    try:
        checkpoint.save_checkpoint(path, 2, model, opt, ByteTokenizer(), {}, {}, rank())
        ok = False
    except checkpoint.CheckpointError as e:
        ok = "saving checkpoint step_000002 failed" in str(e) and "partial save was removed" in str(e)
    finally:
        checkpoint._rng_state = rng_state
    ok &= not list((Path(path) / "checkpoints").iterdir())
    all_ranks_agree(ok, "a save that failed on one rank did not fail cleanly everywhere")


def test_save_failing_on_one_rank_fails_everywhere_and_leaves_nothing(rank_groups, tmp_path):
    rank_groups(2).run(case_save_fails_on_one_rank, str(tmp_path))
