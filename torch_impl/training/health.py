"""Whether the run can still produce a useful model: a non-finite loss, or a loss that no longer
depends on the input, ends it with one line (`TrainingDiverged`) instead of training on."""

from __future__ import annotations

import math

from torch_impl.training.config import TrainConfig

# A model whose loss is bit-identical on this many consecutive steps of different batches no longer
# depends on its input: e.g. --matrix-lr 1e30 grows the residual stream to ~1e31, the final RMSNorm's
# mean square overflows fp32 to inf, every logit becomes 0 and the loss is exactly ln(vocab) on every
# batch, with zero gradients. A living model's loss differs between batches in its low bits.
FLAT_LOSS_STEPS = 3


class TrainingDiverged(RuntimeError):
    """The run cannot produce a useful model any more (non-finite or input-independent loss)."""


class LossWatch:
    """Checks each step's loss; a step skipped for a non-finite gradient (--nonfinite skip) changed
    nothing and is not counted."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.flat, self.previous = 0, None

    def check(self, step: int, loss: float, stepped: bool) -> None:
        if not math.isfinite(loss) and stepped:
            raise TrainingDiverged(f"step {step}: loss is {loss}: training diverged")
        if stepped:
            self.flat, self.previous = (self.flat + 1 if loss == self.previous else 0), loss
        if self.flat >= FLAT_LOSS_STEPS - 1:
            cfg = self.cfg
            raise TrainingDiverged(
                f"step {step}: the loss has been exactly {loss!r} for {FLAT_LOSS_STEPS} steps of different "
                "batches: the model no longer depends on its input (its activations overflowed or vanished; "
                f"are the learning rates too large? --matrix-lr {cfg.matrix_lr:g}, --embedding-lr "
                f"{cfg.embedding_lr:g}, --unembedding-lr {cfg.unembedding_lr:g})")
