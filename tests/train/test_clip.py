"""Gradient clipping acts on the synchronised (rank-averaged) gradient.

Two gloo ranks hold different gradients. clip_grad_norm_synchronized_ must leave both holding exactly
what a single process computes from the mean gradient: torch.nn.utils.clip_grad_norm_ applied to
(g_0 + g_1) / 2. A naive per-rank clip (each rank clips its own g_r, the optimizer averages later) is
shown to give a different result on the same data, so the test can tell the two apart.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_impl.sharding.clip import clip_grad_norm_synchronized_

SHAPES = [(16, 8), (8,), (4, 4, 3)]
WORLD = 2


def rank_grads(rank: int) -> list[torch.Tensor]:
    # rank 1's gradients are larger and point elsewhere: per-rank norms differ from the mean's norm
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, generator=g) * (1 + 3 * rank) for s in SHAPES]


def make_params(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def worker(rank, port, max_norms, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = []
        for max_norm in max_norms:
            params = make_params(rank_grads(rank))
            norm = clip_grad_norm_synchronized_(params, max_norm)
            results.append((norm, [p.grad for p in params]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(max_norm):
    """Single process: clip the mean gradient."""
    mean = [(a + b) / 2 for a, b in zip(rank_grads(0), rank_grads(1))]
    params = make_params(mean)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm, [p.grad for p in params]


def naive_per_rank(max_norm):
    """The bug this guards against: clip unsynchronised gradients, average afterwards."""
    clipped = []
    for r in range(WORLD):
        params = make_params(rank_grads(r))
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        clipped.append([p.grad for p in params])
    return [(a + b) / 2 for a, b in zip(*clipped)]


MAX_NORMS = [1.0, 1e6]  # clipping active; clipping inactive (the result is just the mean)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    mp.spawn(worker, args=(free_port(), MAX_NORMS, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("i", range(len(MAX_NORMS)))
def test_matches_single_process_clip_of_mean_gradient(two_rank_results, i):
    ref_norm, ref_grads = reference(MAX_NORMS[i])
    for rank in range(WORLD):
        norm, grads = two_rank_results[rank][i]
        # fp32 sums in a different order than clip_grad_norm_'s: agree to a few ulps
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
    # both ranks hold bit-identical gradients afterwards: the optimizer's average of them is exact
    for a, b in zip(two_rank_results[0][i][1], two_rank_results[1][i][1]):
        assert torch.equal(a, b)


def test_naive_per_rank_clipping_differs():
    ref = reference(1.0)[1]
    naive = naive_per_rank(1.0)
    assert max((a - b).abs().max().item() for a, b in zip(ref, naive)) > 1e-2


def test_single_process_no_group():
    params = make_params(rank_grads(0))
    ref_norm = torch.nn.utils.clip_grad_norm_(make_params(rank_grads(0)), 0.5)
    norm = clip_grad_norm_synchronized_(params, 0.5)
    # same fp32 norm by a different summation order: a few ULP (u = 6e-8)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    total = torch.sqrt(sum(p.grad.square().sum() for p in params))
    # clip scale max_norm/(norm + 1e-6): the 1e-6 (torch's) leaves the norm 2e-6 below 0.5
    assert total.item() == pytest.approx(0.5, rel=1e-5)
