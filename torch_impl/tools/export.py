"""
Export a trained model's weights to a float32 safetensors file that the JAX reference loads.

    python -m torch_impl.export --checkpoint runs/d4 --out runs/d4/model.safetensors

The tensor names are the torch state_dict names and the layout is nn.Linear's (out, in), which is
exactly what jax_reference.models.gpt.load_safetensors + forward expect. float32 always: it is the precision
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

from torch_impl.models.gpt import GPT, GPTConfig

CONFIG_KEY = "gpt_config"


def check_output_path(path: str | os.PathLike) -> Path:
    """ValueError unless `path` can become a file: not a directory, and its nearest existing
    ancestor a writable directory. Checked before any work (loading a checkpoint, writing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name such as {path / 'model.safetensors'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not a writable directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {path}: the file is not writable")
    return path


def export_safetensors(model: GPT, path: str | os.PathLike) -> Path:
    """Write the model's parameters as fp32 safetensors (atomically: temp file + rename; the
    temporary file is removed if writing fails)."""
    path = check_output_path(path)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(asdict(model.config))})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig stored in an exported file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: no {CONFIG_KEY!r} in the safetensors metadata; not written by torch_impl.export")
    return GPTConfig(**json.loads(meta[CONFIG_KEY]))


def main(argv=None) -> int:
    from torch_impl.training.checkpoint import CheckpointError, load_model

    parser = argparse.ArgumentParser(
        prog="python -m torch_impl.export",
        description="Export a checkpoint's weights to fp32 safetensors (loadable by jax_reference.models.gpt).")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a run's --out-dir (its latest checkpoint)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        check_output_path(args.out)
        model, _, meta = load_model(args.checkpoint)
        path = export_safetensors(model, args.out)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, the file system went away: nothing half-written is left
        print(f"error: writing {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {path} (step {meta['step']}, {model.num_params():,} parameters, config {asdict(model.config)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
