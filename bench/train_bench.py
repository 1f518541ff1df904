"""Training throughput side by side: plain TRL SFTTrainer defaults vs `pipeline sft` vs `pipeline ips`.

    .venv/bin/python bench/train_bench.py [--steps 30] [--hidden_size 256] [--num_layers 4]

One model (the offline tiny-model kit at a chosen size), one dataset (the synthetic code task: its SFT
messages, and the same problems' code-RL rows prepared and scored by `pipeline logp`), the same batch size
and step count; each variant runs in this process, one after the other. Tokens/s counts non-padding input
tokens (`num_input_tokens_seen`) over the training time. On a CPU machine this checks the machinery and
gives ratios; the GPU targets of the IPS issue need a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch

    from pipeline.stages import ips, logp, prepare, sft
    from pipeline.tasks.synthetic import export_task
    from pipeline.tiny import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_bench_"))
    model = make_tiny_model(work / "model", seed=0, hidden_size=args.hidden_size, num_layers=args.num_layers,
                            intermediate_size=4 * args.hidden_size)  # fmt: skip
    data = export_task(work / "data", num_problems=520, seed=0, responses_per_problem=2)
    prepare.main(["--data_path", data["coderl_train"], "--output_dir", str(work / "prepared"), "--overwrite", "true",
                  "--tokenizer_name_or_path", str(model), "--eval_fraction", "0", "--views", "rl"])  # fmt: skip
    logp.main(["--data_path", str(work / "prepared"), "--model_name_or_path", str(model), "--max_length", "256",
               "--splits", "train"])  # fmt: skip
    gpu = torch.cuda.is_available()
    common = ["--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch), "--report_to", "none",
              "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", str(args.steps), "--max_length",
              "256", "--include_num_input_tokens_seen", "non_padding", "--bf16", str(gpu).lower()]  # fmt: skip
    variants = {
        # TRL's defaults for everything else, gradient checkpointing included
        "TRL SFTTrainer defaults (padded)": (sft, ["--model_name_or_path", str(model), "--train_data",
                                                   data["sft_train"]]),
        "pipeline sft (no checkpointing, packing)": (sft, ["--model_name_or_path", str(model), "--train_data",
                                                           data["sft_train"], "--gradient_checkpointing", "false",
                                                           "--packing", "true"]),
        "pipeline ips (no checkpointing)": (ips, ["--model_name_or_path", str(model), "--data_path",
                                                  str(work / "prepared"), "--gradient_checkpointing", "false"]),
    }  # fmt: skip
    rows = []
    for name, (stage, flags) in variants.items():
        out = work / name.split()[0].lower() / str(len(rows))
        result = stage.main([*flags, *common, "--output_dir", str(out)])
        final = next(h for h in reversed(result["log_history"]) if "train_runtime" in h)
        tokens, runtime = final["num_input_tokens_seen"], final["train_runtime"]
        rows.append({"variant": name, "tokens_per_s": round(tokens / runtime) if tokens and runtime else None,
                     "train_runtime_s": runtime, "tokens": tokens})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores, {platform.processor()})"
    print(f"\ndevice: {device}\nvariant | tokens/s | vs TRL defaults")
    base = rows[0]["tokens_per_s"] or 1
    for row in rows:
        print(f"{row['variant']} | {row['tokens_per_s']} | {row['tokens_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
