"""Device facts shared by training and sampling: the autocast policy, a timing barrier, peak FLOP/s for MFU.

Which device a process uses (and its process group) is chosen by torch_impl.training.runtime.init_from_env.
"""

from __future__ import annotations

import contextlib

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in this order (more specific names first). MFU is only reported where the
# peak is known: on CPU it depends on the core count, SIMD width and clock, so pass --peak-flops.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, as nanochat; fp32 on CPU (CPUs without AVX512-BF16 emulate bf16 matmuls, many
    times slower). Training and sampling both use this, so a sample runs in the precision the model was
    trained in."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels are asynchronous), so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU: `override` if given, else PEAK_BF16_FLOPS by GPU name, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
