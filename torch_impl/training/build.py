"""What a run trains, built from its plan: the model (seeded, parallelized from outside, as
torchtitan applies parallelism) and the optimizer (nanochat's Muon + AdamW split)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from torch_impl.models.gpt import GPT
from torch_impl.optim.hybrid import HybridOptimizer, hybrid
from torch_impl.sharding.parallelize import apply_activation_checkpointing, apply_fsdp
from torch_impl.training.config import TrainConfig
from torch_impl.training.plan import Plan
from torch_impl.training.runtime import Dist


def build_model(plan: Plan, d: Dist) -> GPT:
    """The GPT of the plan, initialized whole on every rank from the same seed (identical replicas
    without a broadcast), then parallelized."""
    torch.manual_seed(plan.cfg.seed)  # same seed on every rank: identical replicas without a broadcast
    if d.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    with torch.device("meta"):
        model = GPT(plan.model_config)
    model.to_empty(device=d.device)
    model.init_weights()
    parallelize(model, plan.cfg, d)
    return model


def parallelize(model: GPT, cfg: TrainConfig, d: Dist) -> None:
    """What is applied to the model from outside (sharding/parallelize.py): activation checkpointing,
    then FSDP2 over all ranks with --sharding fsdp (bf16 compute over fp32 master weights on CUDA). The
    weights are initialized whole on every rank (same seed) before fully_shard splits them, so a run
    starts from the same model whatever the sharding."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.sharding == "fsdp" and d.active:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        apply_fsdp(model, mesh, param_dtype=torch.bfloat16 if d.device.type == "cuda" else None,
                   reduce_dtype=getattr(torch, cfg.grad_reduce_dtype))


def build_optimizer(model: GPT, cfg: TrainConfig, ns_dtype: torch.dtype, distributed: bool) -> HybridOptimizer:
    """nanochat's split (optim.hybrid): Muon for the block matrices (or AdamW with --optimizer adamw), AdamW
    (betas (0.8, 0.95), eps 1e-10) for the embedding, lm_head and scalars, their lrs scaled by
    (n_embd/768)^-0.5. --weight-decay is the block matrices' (decoupled); the rest is not decayed."""
    opt = hybrid(model.named_parameters(), matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                 unembedding_lr=cfg.unembedding_lr, model_dim=model.config.n_embd, distributed=distributed,
                 matrix_optimizer="adamw" if cfg.optimizer == "adamw" else "muon",
                 adamw_matrix_lr=cfg.adamw_matrix_lr, weight_decay=cfg.weight_decay,
                 orthogonalizer=cfg.orthogonalizer, ns_steps=cfg.muon_ns_steps(), ns_dtype=ns_dtype,
                 grad_reduce_dtype=getattr(torch, cfg.grad_reduce_dtype), nonfinite=cfg.nonfinite,
                 normuon_beta2=cfg.normuon_beta2, cautious_weight_decay=cfg.cautious_wd,
                 row_equilibration=cfg.row_equilibration, frobenius_renormalization=cfg.frobenius_renormalization,
                 compile=cfg.compile_optimizer)
    # Every block holds 6 matrices (attn c_q, c_k, c_v, c_proj; mlp c_fc, c_proj): a wrapper that
    # renamed or flattened them would otherwise turn the run into AdamW-only without a word.
    if cfg.optimizer == "hybrid":
        routed = sum(len(g["params"]) for g in opt.optimizers["muon"].param_groups) if "muon" in opt.optimizers else 0
        if routed != 6 * model.config.n_layer:
            raise RuntimeError(f"{routed} parameters went to Muon, the model has {6 * model.config.n_layer} block "
                               "matrices: the Muon/AdamW split is misrouting parameters")
    return opt


def whole_model(model: GPT, d: Dist) -> GPT | None:
    """The model with whole parameters on rank 0 (None on the others), for sampling: `model` itself
    unless FSDP2 shards it; then its full state is gathered (a collective) into a plain GPT."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if d.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.master:
        return None
    with torch.device("meta"):
        whole = GPT(model.config)
    whole.to_empty(device=d.device)
    whole.init_weights()  # the rotary buffers, which are not in the state dict
    whole.load_state_dict(full)
    return whole.eval()
