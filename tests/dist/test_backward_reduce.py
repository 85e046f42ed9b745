"""ZeRO-2 in backward (torch_impl/sharding/backward_reduce.py) in 1–4 gloo ranks.

The hooks launch the same reduce_scatter of the same packed buffer as the step would, only
earlier, so a run with `reduce_in_backward()` on the last micro-batch must equal the run
without it bit for bit, with different data on every rank and gradient accumulation. The
tests also check what the hooks promise: the full gradients of every bucket are gone when
backward returns (only the small replicated ones remain), every bucket's reduce_scatter was
launched during backward, the non-finite policy and the "gradient on some ranks only" error
act on every rank as before, and a bf16 wire moves half the bytes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.optim import hybrid
from torch_impl.optim.nonfinite import NonFiniteGradientError

KW = dict(model_dim=32, weight_decay=0.05, ns_dtype=torch.float32, normuon_beta2=0.95)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    # wte and lm_head (64 × 32 = 2048 elements) are AdamW row-sharded; the rest are Muon stacks
    return GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))


def batch(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank())  # other data on every rank
    return torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)


def backward(model, opt, step: int, accum: int, hooks: bool) -> None:
    for micro in range(accum):
        x, y = batch(step, micro)
        loss = model(x, y) / accum
        if hooks and micro == accum - 1:
            with opt.reduce_in_backward(loss):
                loss.backward()
        else:
            loss.backward()


def case_hooks_equal_step_reduction(steps: int, accum: int, wire: str):
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[wire]
    ref = tiny_gpt()
    model = copy.deepcopy(ref)
    opt = hybrid(model.named_parameters(), distributed=True, grad_reduce_dtype=dtype, **KW)
    ref_opt = hybrid(ref.named_parameters(), distributed=True, grad_reduce_dtype=dtype, **KW)
    n = world_size()
    ok = True
    for t in range(steps):
        backward(model, opt, t, accum, hooks=True)
        backward(ref, ref_opt, t, accum, hooks=False)
        if n > 1:
            # the buckets' full gradients were dropped during backward; small ones remain
            for part in opt.optimizers.values():
                bucketed = {p for bucket in part.reducer.buckets for p in bucket.params}
                ok &= bool(bucketed) and all(p.grad is None for p in bucketed)
                ok &= all(p.grad is not None for g in part.param_groups for p in g["params"] if p not in bucketed)
                ok &= len(part.reducer.early) == sum(1 for b in part.reducer.buckets if b.params)
        assert opt.step() and ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    ok &= all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    all_ranks_agree(ok, f"ZeRO-2 in backward ({wire} wire, accum {accum}) != reduction in the step, or "
                        "gradients not dropped / reductions not launched in backward")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_reduce_in_backward_equals_reduce_in_step_bitwise(rank_groups, n):
    rank_groups(n).run(case_hooks_equal_step_reduction, 3, 2, "fp32")


@pytest.mark.parametrize("n", [2, 3])
def test_bf16_wire_in_backward_equals_bf16_wire_in_step_bitwise(rank_groups, n):
    rank_groups(n).run(case_hooks_equal_step_reduction, 2, 1, "bf16")


def case_bf16_wire_halves_the_bytes_and_rounds():
    """The wire format is what it says: half the reduce_scatter bytes, and gradients that are
    not bf16-representable arrive rounded (the result differs from the fp32 wire's)."""
    from torch_impl.optim import AdamW
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 32))
        opt = AdamW([p], lr=0.1, process_group=torch.distributed.group.WORLD, track_stats=True,
                    grad_reduce_dtype=dtype)
        p.grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(rank()))
        opt.step()
        runs[dtype] = (p.detach().clone(), opt.stats.bytes_sent["reduce_scatter"])
    (a, bytes_fp32), (b, bytes_bf16) = runs[torch.float32], runs[torch.bfloat16]
    ok = bytes_bf16 * 2 == bytes_fp32 and not torch.equal(a, b)
    all_ranks_agree(ok, f"bf16 wire: {bytes_bf16} vs {bytes_fp32} bytes, results equal: {torch.equal(a, b)}")


def test_bf16_wire_halves_the_bytes(rank_groups):
    rank_groups(2).run(case_bf16_wire_halves_the_bytes_and_rounds)


def case_nonfinite_in_hooked_backward(policy: str, name: str):
    """NaN in the last rank's gradient of parameter `name`, a hooked bucket (a Muon stack, or an
    AdamW row-sharded parameter: the embedding, lm_head): raise (or skip) on every rank, nothing
    updated; the next step runs normally."""
    model = tiny_gpt()
    opt = hybrid(model.named_parameters(), distributed=True, nonfinite=policy, **KW)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, 0)
    poison = model.get_parameter(name)
    bucketed = {p for part in opt.optimizers.values() for bucket in part.reducer.buckets for p in bucket.params}
    assert poison in bucketed, f"{name} is not reduced in backward: the case would not test the hooks"
    handle = poison.register_hook(lambda g: g * float("nan") if rank() == world_size() - 1 else g)
    loss = model(x, y)
    with opt.reduce_in_backward(loss):
        loss.backward()
    handle.remove()
    outcome = "stepped"
    try:
        if not opt.step():
            outcome = "skipped"
    except NonFiniteGradientError as e:
        outcome = "raised" if name in str(e) else f"wrong message: {e}"
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.zero_grad()
    loss = model(x, y)
    with opt.reduce_in_backward(loss):
        loss.backward()
    ok = opt.step() and outcome == ("raised" if policy == "raise" else "skipped") and unchanged
    ok &= not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    all_ranks_agree(ok, f"policy {policy}, NaN in {name}: {outcome}, parameters unchanged: {unchanged}")


@pytest.mark.parametrize("name", ["transformer.h.1.mlp.c_fc.weight",  # Muon
                                  "transformer.wte.weight", "lm_head.weight"])  # AdamW, row-sharded
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_in_hooked_backward_acts_on_every_rank(rank_groups, policy, name):
    rank_groups(3).run(case_nonfinite_in_hooked_backward, policy, name)


def case_grad_on_some_ranks_in_hooked_backward():
    """A block matrix gets no gradient on rank 0 only: entering reduce_in_backward (which reads
    the autograd graph) raises on every rank before any bucket is launched."""
    model = tiny_gpt()
    opt = hybrid(model.named_parameters(), distributed=True, **KW)
    x, y = batch(0, 0)
    lonely = model.transformer.h[0].attn.c_q.weight
    if rank() == 0:
        lonely.requires_grad_(False)
    loss = model(x, y)
    try:
        with opt.reduce_in_backward(loss):
            loss.backward()
        ok = False
    except ValueError as e:  # before backward, before anything is launched
        ok = "some ranks but not on others" in str(e) and "transformer.h.0.attn.c_q.weight" in str(e)
    all_ranks_agree(ok, "a gradient missing on one rank under hooks did not raise everywhere")


def test_grad_on_some_ranks_in_hooked_backward_raises_everywhere(rank_groups):
    rank_groups(2).run(case_grad_on_some_ranks_in_hooked_backward)
