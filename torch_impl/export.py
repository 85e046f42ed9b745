"""
Export a trained model's weights to a float32 safetensors file that the JAX reference loads.

    python -m torch_impl.export --checkpoint runs/d4 --out runs/d4/model.safetensors

The tensor names are the torch state_dict names and the layout is nn.Linear's (out, in), which is
exactly what jax_reference.gpt.load_safetensors + forward expect. float32 always: it is the precision
the weights were trained in (bf16 is only the autocast compute dtype), and the JAX loader's fp32 path
needs no special decoding. The model config travels in the file's metadata (safetensors metadata is
str -> str, so it is JSON), so the file alone is enough to rebuild the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torch_impl.gpt import GPT, GPTConfig

CONFIG_KEY = "gpt_config"


def export_safetensors(model: GPT, path: str | os.PathLike) -> Path:
    """Write the model's parameters as fp32 safetensors (atomically: temp file + rename)."""
    path = Path(path)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(asdict(model.config))})
    os.replace(tmp, path)
    return path


def read_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig stored in an exported file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no {CONFIG_KEY!r} in the safetensors metadata; not written by torch_impl.export")
    return GPTConfig(**json.loads(meta[CONFIG_KEY]))


def main(argv=None) -> int:
    from torch_impl.checkpoint import CheckpointError, load_model

    parser = argparse.ArgumentParser(
        prog="python -m torch_impl.export",
        description="Export a checkpoint's weights to fp32 safetensors (loadable by jax_reference.gpt).")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a run's --out-dir (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        model, _, meta = load_model(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = export_safetensors(model, args.out)
    print(f"wrote {path} (step {meta['step']}, {model.num_params():,} parameters, config {asdict(model.config)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
