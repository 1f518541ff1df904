"""Do two versions of the code train IPS alike? Same data, model, seed: the per-step losses side by side.

    .venv/bin/python bench/ips_equivalence.py --old OTHER_CHECKOUT/src [--new src] [--rows 2000]
        [--workdir /tmp/ips_equivalence]

Prepares `--rows` synthetic logged rows (as bench/scale_bench.py makes them), scores them with the tiny
model (`pipeline logp`, by the new code), then runs 12 IPS steps with each version's `src/` in a child
process, for `reward_baseline` none and prompt_mean, and prints the largest difference of a step's loss.
Used to check that the tokenized view (issue 26) left IPS's training unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import make_rows  # noqa: E402

CHILD = r"""
import json, sys
from pipeline.stages import ips
out, data, store, model, baseline = sys.argv[1:6]
r = ips.main(["--data_path", data, "--logp_dir", store, "--model_name_or_path", model, "--output_dir", out,
              "--max_length", "128", "--bf16", "false", "--dtype", "float32", "--report_to", "none",
              "--save_strategy", "no", "--eval_strategy", "no", "--per_device_train_batch_size", "8",
              "--gradient_checkpointing", "false", "--max_steps", "12", "--logging_steps", "1",
              "--learning_rate", "1e-3", "--seed", "7", "--reward_baseline", baseline])
print("LOSSES " + json.dumps([h["loss"] for h in r["log_history"] if "loss" in h]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the other version's src/ folder")
    parser.add_argument("--new", default=str(Path(__file__).resolve().parents[1] / "src"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/ips_equivalence")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": args.new, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PIPELINE_CACHE_DIR": str(work / "cache")}  # fmt: skip
    make_rows(work / "rows.parquet", args.rows)
    model, data, store = work / "model", work / "prepared", work / "logp"
    for argv in (["tiny-model", "--output_dir", str(model)],
                 ["prepare", "--data_path", str(work / "rows.parquet"), "--output_dir", str(data),
                  "--tokenizer_name_or_path", str(model)],
                 ["logp", "--data_path", str(data), "--model_name_or_path", str(model), "--max_length", "128",
                  "--output_dir", str(store)]):  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *argv], env=env, check=True, capture_output=True
        )
    for baseline in ("none", "prompt_mean"):
        losses = {}
        for name, src in (("old", args.old), ("new", args.new)):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(work / f"{name}-{baseline}"), str(data),
                                   str(store), str(model), baseline], env={**env, "PYTHONPATH": src},
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("LOSSES ")][-1]
            losses[name] = json.loads(line[len("LOSSES ") :])
        worst = max(abs(a - b) for a, b in zip(losses["old"], losses["new"], strict=True))
        print(
            f"reward_baseline {baseline}: {len(losses['new'])} steps, largest |loss difference| {worst:.3g}"
        )
        print(f"  old {[round(x, 6) for x in losses['old']]}\n  new {[round(x, 6) for x in losses['new']]}")


if __name__ == "__main__":
    main()
