"""`pipeline tiny-model`: write the offline tiny tokenizer + random causal LM (built by `pipeline.tiny`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.tiny import make_tiny_model


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="pipeline tiny-model",
        description="Build an offline tiny tokenizer + random causal LM (for tests, demos and smoke runs). "
        "Same arguments give byte-identical files.",
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        help="folder to write (a tiny model made earlier there is replaced; any other existing folder is refused)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--arch", choices=["qwen2", "llama"], default="qwen2", help="model family (default qwen2)"
    )
    parser.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--intermediate_size", type=int, default=256)
    args = parser.parse_args(argv)
    path = make_tiny_model(
        args.output_dir,
        seed=args.seed,
        arch=args.arch,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
    )
    print(f"tiny model written to {path}")
    return path
