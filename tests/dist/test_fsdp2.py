"""Muon and AdamW on FSDP2 parameters (DTensors sharded by rows, Shard(0)) in 1–4 gloo ranks.

AdamW: each rank updates its rows of each parameter with the gradient FSDP reduced, no
collective of its own. Muon: per same-shape stack, one all_to_all sends the gradient rows to
each matrix's owner, the owner computes the direction of the whole matrix, one all_to_all
returns each rank its rows, each rank applies them (sharding/row_owners.py). Gradients here are
placed with `distribute_tensor` (exact: the full gradient, split by rows), so both must equal
the single-device optimizers bit for bit, state included, for dims 0 that N divides, does
not divide, and that are smaller than N. A real `fully_shard` model checks that its
parameters are what the optimizers expect.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.common import clone_params, exact_randn, make_params
from tests.dist.harness import all_ranks_agree, rank, world_size
from torch_impl.optim import AdamW, DistAdamW, DistMuon, Muon
from torch_impl.sharding.placement import Rows, ShardedRows, owner_counts

F32, BF16 = torch.float32, torch.bfloat16
# 5 rows: N = 2, 3, 4 do not divide; (1, 8) and (3, 4): fewer rows than ranks; bf16 and 1-D too
SPECS = [((5, 16), F32), ((1, 8), F32), ((40, 32), BF16), ((7,), F32), ((3, 4), F32), ((8, 8), F32)]
KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)


def mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world_size(),))


def as_fsdp2(params, device_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    return [torch.nn.Parameter(distribute_tensor(p.detach().clone(), device_mesh, [Shard(0)])) for p in params]


def step_pair(specs, dist_cls, cls, kw: dict, steps: int, seed: int):
    """The parameters of `specs` as FSDP2 DTensors under dist_cls and whole under cls (one
    process), stepped `steps` times with the same exact gradients (split by rows for FSDP2)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    m = mesh()
    full = make_params(specs)
    ref = clone_params(full)
    params = as_fsdp2(full, m)
    opt, ref_opt = dist_cls(params, **kw, track_stats=True), cls(ref, **kw)
    for t in range(steps):
        for i, (p, q) in enumerate(zip(params, ref)):
            g = exact_randn(q.shape, seed, t, i, dtype=q.dtype)
            q.grad = g.clone()
            p.grad = distribute_tensor(g, m, [Shard(0)])
        opt.step()
        ref_opt.step()
    return params, ref, opt, ref_opt


def case_adamw_on_fsdp2_equals_single_device(steps):
    params, ref, opt, ref_opt = step_pair(SPECS, DistAdamW, AdamW, KW, steps, 21)
    ok = all(torch.equal(p.full_tensor(), q) for p, q in zip(params, ref))
    for p, q in zip(params, ref):
        place = opt.placement(p)
        ok &= isinstance(place, ShardedRows)
        start, end = place.local_rows(rank())
        if end > start:  # this rank's rows of the state, and the step count
            s, r = opt.state[p], ref_opt.state[q]
            ok &= torch.equal(s["step"], r["step"])
            ok &= all(torch.equal(s[k], r[k][start:end]) for k in ("exp_avg", "exp_avg_sq"))
        else:  # owns no rows: no state at all
            ok &= p not in opt.state
    # no collective of the optimizer's own beyond the one flag all_reduce of each step
    ok &= set(opt.stats.calls) <= {"all_reduce"} and opt.stats.calls.get("all_reduce", 0) == (
        steps if world_size() > 1 else 0)
    all_ranks_agree(ok, "AdamW on FSDP2 DTensors != single-device AdamW bitwise")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_adamw_on_fsdp2_parameters_equals_single_device_bitwise(rank_groups, n):
    rank_groups(n).run(case_adamw_on_fsdp2_equals_single_device, 3)


# Muon stacks: 5 rows (N = 2, 3, 4 do not divide; a 3-matrix stack: K mod N ≠ 0), a wide
# (1, 8) and a tall 32×1 (dims 0 < N, and a 1-column matrix), bf16 next to fp32 of one shape
# (two stacks), a 4-D kernel viewed as (6, 12)
MUON_SPECS = [((5, 16), F32), ((5, 16), F32), ((5, 16), F32), ((1, 8), F32), ((32, 1), F32),
              ((12, 10), BF16), ((12, 10), F32), ((12, 10), BF16), ((6, 3, 2, 2), F32)]
MUON_KW = {
    "plain": dict(lr=0.02, momentum=0.95, weight_decay=0.1),
    # NorMuon reduces over rows for wide matrices and over columns for tall ones: both occur
    "normuon_cautious": dict(lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.1,
                             cautious_weight_decay=True, normuon_beta2=0.95, shape_scale="match_rms_adamw"),
    "polar_express_fp32": dict(lr=0.02, orthogonalizer="polar_express", ns_dtype=F32),
}


def case_muon_on_fsdp2_equals_single_device(steps, kw_name):
    n, r = world_size(), rank()
    params, ref, opt, ref_opt = step_pair(MUON_SPECS, DistMuon, Muon, MUON_KW[kw_name], steps, 31)
    ok = all(torch.equal(p.full_tensor(), q) for p, q in zip(params, ref))
    # the owner keeps the whole matrix's state, equal to the single-device state; others none
    for p, q in zip(params, ref):
        if opt.placement(p).holds(r):
            ok &= all(torch.equal(opt.state[p][k], ref_opt.state[q][k]) for k in ref_opt.state[q])
        else:
            ok &= p not in opt.state
    # the work: this rank orthogonalized exactly the matrices owner_counts gives it, each once
    # per step; the traffic: only the two all_to_alls (+ the flag all_reduce), as computed
    # from the row split (each rank sends its rows of every matrix it does not own, fp32 or
    # bf16 as the gradient, and receives fp32 directions back)
    s = opt.stats
    mine = sum(1 for p in params if opt.placement(p).holds(r))
    want_grads = want_dirs = 0
    for layout in opt.layouts:
        rows = layout.params[0].shape[0]
        split = Rows(rows, layout.row_chunk)
        cols = layout.params[0].numel() // rows
        for p, owner in zip(layout.params, layout.owners()):
            here = split.local_rows(r)
            if owner != r:
                want_grads += (here[1] - here[0]) * cols * p.element_size()
            else:
                want_dirs += sum(e - b for q, (b, e) in enumerate(map(split.local_rows, range(n))) if q != r) * cols * 4
    ok &= s.matrices == steps * mine
    if n > 1:
        ok &= set(s.calls) == {"all_reduce", "all_to_all_grads", "all_to_all_directions"}
        ok &= s.calls["all_to_all_grads"] == s.calls["all_to_all_directions"] == steps * len(opt.layouts)
        ok &= s.bytes_sent["all_to_all_grads"] == steps * want_grads
        ok &= s.bytes_sent["all_to_all_directions"] == steps * want_dirs
    else:
        ok &= not s.calls
    all_ranks_agree(ok, f"Muon ({kw_name}) on FSDP2 DTensors != single-device Muon bitwise, or the "
                        f"work/traffic differs from the layout's (stats {s})")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("kw_name", list(MUON_KW))
def test_muon_on_fsdp2_parameters_equals_single_device_bitwise(rank_groups, n, kw_name):
    rank_groups(n).run(case_muon_on_fsdp2_equals_single_device, 3, kw_name)


def test_muon_fsdp2_owner_counts_are_the_cost_balanced_ones():
    """The layout of MUON_SPECS at 3 ranks, by hand: stacks by cost, remainders to the least
    loaded ranks (placement.owner_counts), each owner a contiguous run of its stack."""
    from torch_impl.sharding.placement import muon_layouts, ns_cost
    stacks = [(0, [p for p in make_params(MUON_SPECS) if (tuple(p.shape), p.dtype) == (shape, dtype)])
              for shape, dtype in [((5, 16), F32), ((1, 8), F32), ((32, 1), F32), ((12, 10), BF16),
                                   ((12, 10), F32), ((6, 3, 2, 2), F32)]]
    layouts, placements = muon_layouts(stacks, 3, [5])
    costs = [ns_cost(s[0].shape) for _, s in stacks]
    assert [layout.owners() for layout in layouts] == [
        [r for r, c in enumerate(counts) for _ in range(c)]
        for counts in owner_counts([(len(s), c) for (_, s), c in zip(stacks, costs)], 3)]
    # by hand: the (12, 10) stacks cost 5·10²·34 = 17000 a matrix: bf16 (seen first, 2
    # matrices) to ranks 0, 1, fp32 to rank 2; (6, 12) (5·6²·30 = 5400) to rank 0 (all
    # tie); (5, 16) (4625) one each; (32, 1) (325) to rank 1 (21625 vs rank 0's 27025),
    # (1, 8) (85) then to rank 2 (21625 < 21950)
    assert [layout.owners() for layout in layouts] == [[0, 1, 2], [2], [1], [0, 1], [2], [0]]


def case_fully_shard_model_gives_sharded_rows():
    """What fully_shard produces is what the optimizer expects: every parameter ShardedRows
    with FSDP's own local rows."""
    from torch.distributed.fsdp import fully_shard
    m = mesh()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 5), torch.nn.Linear(5, 1, bias=False))
    for layer in model:
        fully_shard(layer, mesh=m)
    fully_shard(model, mesh=m)
    opt = DistAdamW(model.parameters(), **KW)
    ok = True
    for p in model.parameters():
        place = opt.placement(p)
        start, end = place.local_rows(rank())
        ok &= isinstance(place, ShardedRows) and p.to_local().shape[0] == end - start
    all_ranks_agree(ok, "fully_shard parameters are not the ShardedRows the optimizer computed")


@pytest.mark.parametrize("n", [2, 3])
def test_fully_shard_parameters_are_sharded_rows(rank_groups, n):
    rank_groups(n).run(case_fully_shard_model_gives_sharded_rows)


def raises_everywhere(fn, match: str) -> None:
    try:
        fn()
    except ValueError as e:
        all_ranks_agree(match in str(e), f"wrong message: {e}")
        return
    all_ranks_agree(False, "did not raise ValueError on this rank")


def case_unsupported_layouts_raise_everywhere():
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    m = mesh()
    sharded = as_fsdp2(make_params([((8, 8), F32)]), m)
    plain = make_params([((8, 8), F32)])
    raises_everywhere(lambda: DistAdamW(sharded + plain), "mixed with 1 plain")
    raises_everywhere(lambda: DistMuon(sharded + plain), "mixed with 1 plain")
    by_cols = [torch.nn.Parameter(distribute_tensor(torch.zeros(8, 8), m, [Shard(1)]))]
    raises_everywhere(lambda: DistAdamW(by_cols), "only Shard(0)")
    raises_everywhere(lambda: DistMuon(by_cols), "only Shard(0)")
    replicated = [torch.nn.Parameter(distribute_tensor(torch.zeros(8, 8), m, [Replicate()]))]
    raises_everywhere(lambda: DistAdamW(replicated), "only Shard(0)")
    raises_everywhere(lambda: DistMuon(replicated), "only Shard(0)")
    own, _ = torch.distributed.new_subgroups(group_size=1)  # every rank a group of its own, not the mesh's 2
    raises_everywhere(lambda: AdamW(sharded, process_group=own), "mesh of 2 ranks")
    raises_everywhere(lambda: Muon(sharded, process_group=own), "mesh of 2 ranks")


def test_unsupported_layouts_raise_on_every_rank(rank_groups):
    rank_groups(2).run(case_unsupported_layouts_raise_everywhere)


def case_dtensor_parameters_shard_over_their_mesh_by_default(steps):
    """Muon / AdamW (not Dist*) given FSDP2 DTensors and no process_group take their mesh's group:
    sharded over it, and equal to the single-device optimizer bit for bit."""
    ok = True
    for cls, specs, kw, seed in ((AdamW, SPECS, KW, 21), (Muon, MUON_SPECS, MUON_KW["plain"], 31)):
        params, ref, opt, _ = step_pair(specs, cls, cls, kw, steps, seed)
        ok &= opt.comm.world_size == world_size() and not opt.comm.is_local
        ok &= all(torch.equal(p.full_tensor(), q) for p, q in zip(params, ref))
    all_ranks_agree(ok, "an optimizer of DTensors without a process_group did not shard over their mesh")


def test_dtensor_parameters_shard_over_their_mesh_by_default(rank_groups):
    rank_groups(3).run(case_dtensor_parameters_shard_over_their_mesh_by_default, 2)


# ---- checkpoints: saved sharded at N ranks, loaded whole without a process group -------------

def fsdp2_steps(params, opt, steps_range, device_mesh=None):
    from torch.distributed.tensor import Shard, distribute_tensor
    for t in steps_range:
        for i, p in enumerate(params):
            g = exact_randn(tuple(p.shape), 23, t, i, dtype=p.dtype)
            p.grad = g if device_mesh is None else distribute_tensor(g, device_mesh, [Shard(0)])
        opt.step()


def case_save_fsdp2(path, steps):
    from torch_impl.sharding.optimizer_checkpoint import consolidated_state, save_optimizer
    m = mesh()
    params = as_fsdp2(make_params(SPECS), m)
    opt = DistAdamW(params, **KW)
    fsdp2_steps(params, opt, range(steps), m)
    save_optimizer(opt, path)
    full = consolidated_state(opt)
    ref = make_params(SPECS)
    ref_opt = AdamW(ref, **KW)
    fsdp2_steps(ref, ref_opt, range(steps))
    want = consolidated_state(ref_opt)
    same = full.keys() == want.keys() and all(torch.equal(full[k], want[k]) for k in want)
    all_ranks_agree(rank() != 0 or same, "consolidated FSDP2 AdamW state != single-device state")
    return [p.full_tensor().detach() for p in params]


@pytest.mark.parametrize("n", [2, 3])
def test_checkpoint_saved_on_fsdp2_resumes_on_one_process(rank_groups, tmp_path, n):
    from torch_impl.sharding.optimizer_checkpoint import load_optimizer
    path = str(tmp_path / "opt")
    saved = rank_groups(n).run(case_save_fsdp2, path, 2)[0]
    params = [torch.nn.Parameter(t.clone()) for t in saved]
    opt = AdamW(params, **KW)
    load_optimizer(opt, path)  # here, without any process group
    fsdp2_steps(params, opt, range(2, 4))
    ref = make_params(SPECS)
    ref_opt = AdamW(ref, **KW)
    fsdp2_steps(ref, ref_opt, range(4))
    assert all(torch.equal(p, q) for p, q in zip(params, ref))


# ---- a GPT under fully_shard with the nanochat hybrid ------------------------------------------
# Every rank gets the same batch, so FSDP's gradient reduce_scatter averages N identical values:
# exact at N = 1, 2 (x + x and the division by 2 are exact), so the sharded run must equal the
# single-device run bit for bit. (At N = 3 or 4 gloo's sequential sum (x + x) + x can round.)

def gpt_pair(checkpointing: bool):
    import copy

    from torch_impl.models.gpt import GPT, GPTConfig
    from torch_impl.sharding.parallelize import apply_activation_checkpointing, apply_fsdp
    torch.manual_seed(0)
    # n_kv_head < n_head: c_k / c_v form their own (16, 32) stack next to the (32, 32) one
    ref = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model = copy.deepcopy(ref)
    if checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, mesh())
    return model, ref


def case_gpt_hybrid_on_fsdp2(steps, accum, checkpointing):
    from torch_impl.optim import hybrid
    from torch_impl.orthogonalizers.newton_schulz import newton_schulz
    model, ref = gpt_pair(checkpointing)
    seen = [0]

    def counting_ns(X, **kw):  # counts the matrices orthogonalized on this rank
        seen[0] += X.shape[0] if X.ndim == 3 else 1
        return newton_schulz(X, **kw)

    kw = dict(model_dim=32, weight_decay=0.05, orthogonalizer=counting_ns)
    opt = hybrid(model.named_parameters(), distributed=True, **kw)
    ref_opt = hybrid(ref.named_parameters(), **dict(kw, orthogonalizer="newton_schulz"))
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randint(0, 64, (2, 16), generator=gen)
            y = torch.randint(0, 64, (2, 16), generator=gen)
            for m in (model, ref):
                (m(x, y) / accum).backward()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    named_ref = dict(ref.named_parameters())
    from torch_impl.optim.hybrid import canonical_name
    ok = all(torch.equal(p.full_tensor(), named_ref[canonical_name(name)]) for name, p in model.named_parameters())
    muon = opt.optimizers["muon"]
    owned = sum(1 for g in muon.param_groups for p in g["params"] if muon.placement(p).holds(rank()))
    # Newton-Schulz once per optimizer step, never per micro-batch (a ZeRO-3 trap): this rank
    # orthogonalized its owned matrices once per step
    ok &= seen[0] == steps * owned and len(muon.param_groups[0]["params"]) == 6 * 2
    all_ranks_agree(ok, f"GPT + hybrid on FSDP2 (accum {accum}, checkpointing {checkpointing}) != single "
                        f"device, or NS ran {seen[0]} times for {owned} owned matrices × {steps} steps")


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("accum,checkpointing", [(1, False), (2, True)])
def test_gpt_hybrid_on_fsdp2_equals_single_device_bitwise(rank_groups, n, accum, checkpointing):
    rank_groups(n).run(case_gpt_hybrid_on_fsdp2, 3, accum, checkpointing)


# ---- DCP checkpoints of a sharded model and optimizer: saved at N ranks, loaded at M ------------
# The hybrid on the parameters of test_dist_hybrid.py (Muon stacks with bf16, NorMuon, cautious
# decay; AdamW rows and small parameters), all FSDP2 DTensors. The model goes through DCP as
# DTensor row shards, the optimizer through sharding/optimizer_checkpoint.py; with exact gradients every world
# size equals the single-device run bit for bit, so a run resumed at M must equal it too.

def fsdp2_model(device_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from tests.dist.test_dist_hybrid import ckpt_model
    return {k: torch.nn.Parameter(distribute_tensor(v.detach(), device_mesh, [Shard(0)]) if device_mesh else v.detach())
            for k, v in ckpt_model().items()}


def train_fsdp2(model, opt, steps, device_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    for t in steps:
        for i, p in enumerate(model.values()):
            g = exact_randn(tuple(p.shape), 13, t, i, dtype=p.dtype)
            p.grad = distribute_tensor(g, device_mesh, [Shard(0)]) if device_mesh else g
        opt.set_lr_multiplier(1.0 - 0.1 * t)
        opt.set_muon_momentum(0.85 + 0.02 * t)
        assert opt.step()
        opt.zero_grad()


def case_fsdp2_checkpoint(path, save_steps, total, save: bool):
    """save: train `save_steps` and write model + optimizer; else: load them and train to `total`.
    Either way the result must equal the single-device uninterrupted run. One rank loads without
    FSDP (plain tensors), as `python -m torch_impl.sample` would."""
    import torch.distributed.checkpoint as dcp

    from tests.dist.test_dist_hybrid import KW, reference, same_state
    from torch_impl.optim import hybrid
    from torch_impl.sharding.optimizer_checkpoint import consolidated_state, load_optimizer, save_optimizer
    device_mesh = mesh() if world_size() > 1 else None
    model = fsdp2_model(device_mesh)
    opt = hybrid(model.items(), distributed=device_mesh is not None, **KW)
    if save:
        train_fsdp2(model, opt, range(save_steps), device_mesh)
        dcp.save(dict(model), checkpoint_id=path + "/model")
        save_optimizer(opt, path + "/opt")
        steps = save_steps
    else:
        state = dict(model)
        dcp.load(state, checkpoint_id=path + "/model", no_dist=device_mesh is None)
        load_optimizer(opt, path + "/opt")
        train_fsdp2(model, opt, range(save_steps, total), device_mesh)
        steps = total
    ref_model, ref_opt = reference(steps)
    whole = {k: p.full_tensor() if device_mesh else p for k, p in model.items()}
    ok = all(torch.equal(whole[k], ref_model[k]) for k in whole)
    full, ref_full = consolidated_state(opt), consolidated_state(ref_opt)  # both collective
    ok &= rank() != 0 or same_state(full, ref_full)
    all_ranks_agree(ok, f"FSDP2 {'saved' if save else 'resumed'} run at {world_size()} ranks != single device")


@pytest.mark.parametrize("n,resume_at", [(2, [1, 3]), (4, [2]), (3, [4])])
def test_fsdp2_checkpoint_saved_at_n_resumes_at_m(rank_groups, tmp_path, n, resume_at):
    path = str(tmp_path)
    rank_groups(n).run(case_fsdp2_checkpoint, path, 2, 4, True)
    for m in resume_at:
        if m == 1:
            case_fsdp2_checkpoint(path, 2, 4, False)  # in pytest's process: no process group at all
        else:
            rank_groups(m).run(case_fsdp2_checkpoint, path, 2, 4, False)


# ---- torch.optim.Muon on FSDP2 DTensors: the comparison point ----------------------------------
# torch.optim.Muon has no sharded path of its own: on DTensor parameters its Newton-Schulz runs
# through DTensor's implicit redistribution. What that gives at 2 ranks, pinned so that a change
# upstream shows up here (and in the README's table):
#   - wide and square matrices: every NS matmul all_gathers its sharded operand (X twice and
#     the Gram matrix once per iteration, 15 gathers in all) on every rank, plus one all_reduce
#     of the norm; the result equals torch.optim.Muon on whole tensors bit for bit, but each rank
#     does the whole matrix's NS (N× the work) and, for a square matrix, moves 15·(N−1)/N of the
#     bf16 matrix: 3.75·N× the bytes of our owner all_to_all pair
#   - tall matrices (NS works on Xᵀ): the matmuls contract the sharded dim into partial sums
#     that are all_reduced, a different bf16 summation: not bit-identical to the whole-tensor run
#   - a (1, 8) head (fewer rows than ranks): RuntimeError, "in-place operations that require
#     placement changes" (as reported elsewhere, ../shared/ANCHORS.md)
TORCH_MUON_SHAPES = [(16, 16), (8, 24), (24, 16), (32, 1), (1, 8)]


def case_torch_muon_on_fsdp2():
    from torch.distributed.tensor import Shard, distribute_tensor

    from benchmarks.traffic import DTensorTraffic
    m, n = mesh(), world_size()
    out = {}
    for i, shape in enumerate(TORCH_MUON_SHAPES):
        full, g = exact_randn(shape, 41, i), exact_randn(shape, 42, i)
        whole = torch.nn.Parameter(full.clone())
        whole.grad = g.clone()
        torch.optim.Muon([whole], lr=0.02).step()
        sharded = torch.nn.Parameter(distribute_tensor(full.clone(), m, [Shard(0)]))
        sharded.grad = distribute_tensor(g, m, [Shard(0)])
        ours = torch.nn.Parameter(distribute_tensor(full.clone(), m, [Shard(0)]))
        ours.grad = distribute_tensor(g, m, [Shard(0)])
        # ours with torch.optim.Muon's settings (weight decay 0.1, bf16 NS); the bytes are this rank's
        opt = DistMuon([ours], lr=0.02, weight_decay=0.1, track_stats=True)
        opt.step()
        row = dict(ours_bytes=sum(v for k, v in opt.stats.bytes_sent.items() if k.startswith("all_to_all")))
        try:
            with DTensorTraffic(n) as traffic:
                torch.optim.Muon([sharded], lr=0.02).step()
            row.update(equal=torch.equal(sharded.full_tensor(), whole),
                       diff=(sharded.full_tensor() - whole).abs().max().item(),
                       calls=dict(traffic.stats.calls), bytes=traffic.stats.total_bytes_sent)
        except RuntimeError as e:
            row.update(error=str(e).splitlines()[0])
        out[shape] = row
    return out


def test_torch_optim_muon_on_fsdp2_for_comparison(rank_groups):
    ranks = rank_groups(2).run(case_torch_muon_on_fsdp2)
    n = 2
    for shape in [(16, 16), (8, 24)]:
        for res in ranks:
            row = res[shape]
            assert row["equal"], (shape, row)
            assert row["calls"] == {"all_gather_into_tensor": 15, "all_reduce": 1}, (shape, row)
            # per NS iteration: A = X·Xᵀ and B·X gather this rank's rows of the bf16 X, A·A its
            # rows of the rows×rows A; plus the all_reduce of the bf16 norm
            x_rows, a_rows = shape[0] // n * shape[1] * 2, shape[0] // n * shape[0] * 2
            assert row["bytes"] == 5 * (n - 1) * (2 * x_rows + a_rows) + 2 * (n - 1) / n * 2, (shape, row)
        # ours over both ranks: the owner's peer sends its fp32 gradient rows and receives the
        # direction's: 2·(N−1)/N of the fp32 matrix in all, vs 15·(N−1) bf16 shards per rank
        ours = sum(res[shape]["ours_bytes"] for res in ranks)
        assert ours == 2 * (n - 1) / n * shape[0] * shape[1] * 4
    ours = sum(res[(16, 16)]["ours_bytes"] for res in ranks)
    assert sum(res[(16, 16)]["bytes"] for res in ranks) == 3.75 * n * ours + 2 * 2  # + the norm's
    for shape in [(24, 16), (32, 1)]:
        row = ranks[0][shape]
        assert not row["equal"] and row["diff"] > 0 and set(row["calls"]) == {"all_reduce"}, (shape, row)
    assert "placement changes" in ranks[0][(1, 8)].get("error", ""), ranks[0][(1, 8)]
