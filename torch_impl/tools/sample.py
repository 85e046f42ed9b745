"""
Generate text from a checkpoint.

    python -m torch_impl.sample --checkpoint runs/d4 --prompt "def " --max-tokens 200

--checkpoint takes a checkpoint directory or a run's --out-dir (its latest checkpoint). Tokens are
streamed to stdout as they are sampled. The prompt is prefixed with <|bos|>, as every training
document was, so the model sees a prompt the way it saw the start of a document.
"""

from __future__ import annotations

import argparse
import sys

import torch

from torch_impl.training.checkpoint import CheckpointError, load_model
from torch_impl.training.generate import generate_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_impl.sample",
                                     description="Sample text from a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a run's --out-dir (its latest checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. a new document)")
    parser.add_argument("--max-tokens", type=int, default=200, help="number of tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k most likely tokens; 0 = all (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    if args.max_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        parser.error("--max-tokens, --temperature and --top-k must be >= 0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    try:
        model, tokenizer, meta = load_model(args.checkpoint, device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_len = model.rotary_seq_len
    if 1 + len(tokenizer.encode(args.prompt)) + args.max_tokens - 1 > max_len:
        print(f"error: prompt + --max-tokens exceed the model's {max_len} positions", file=sys.stderr)
        return 2
    print(f"# step {meta['step']} checkpoint, {model.num_params():,} parameters", file=sys.stderr)
    sys.stdout.write(args.prompt)
    generate_text(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_k or None,
                  args.seed, stream=sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
