"""Where IPS's step-0 mismatch threshold (`logp_mismatch_threshold`) should sit: the first batch's mean and
max |log πθ − log π_ref| per response token, and the k3 KL, when the policy starts from the reference.

    .venv/bin/python bench/logp_mismatch_bench.py            # CPU, ~2 min: the 4-layer tiny model, SFT'd

Chain: the synthetic code task → a 4-layer tiny model SFT'd on it (so that its log-probs are as peaked as a
real policy's, not uniform) → `prepare` → `logp` in float32 and in bfloat16 → one IPS step at learning rate
0 per case, with the threshold off, reading run.json's `logp_mismatch`:
- fp32 logps, fp32 training (the matched case: ρ = 1 up to float rounding);
- bf16 logps, fp32 training, and fp32 logps, bf16 training (`allow_logp_dtype_mismatch`);
- bf16 logps, bf16 training (weights loaded in bf16 in both stages);
- stale logps: each row's logps swapped with another row's of the same token count (data re-prepared with
  other responses of equal length), imported the old way, so no binding can catch it and only step 0 can.
Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMON = ["--gradient_checkpointing", "false", "--report_to", "none", "--eval_strategy", "no", "--save_strategy",
          "no", "--learning_rate", "0", "--max_steps", "1", "--logging_steps", "1", "--seed", "0",
          "--logp_mismatch_threshold", "none", "--allow_logp_dtype_mismatch", "true"]  # fmt: skip


def stale_store(store: Path, out: Path) -> Path:
    """The store's logps moved between rows of equal token count, as old pickles (unbound)."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(store.glob("*-part-*.parquet"))])
    uids, logps = table.column("uid").to_pylist(), table.column("logps").to_pylist()
    by_length: dict[int, list[int]] = {}
    for i, values in enumerate(logps):
        by_length.setdefault(len(values), []).append(i)
    moved = {}
    for rows in by_length.values():
        for i, j in zip(rows, rows[1:] + rows[:1], strict=True):
            moved[uids[i]] = np.asarray(logps[j], dtype=np.float32)
    pickles = out.parent / f"{out.name}_pickles"
    pickles.mkdir(parents=True, exist_ok=True)
    with open(pickles / "rank0.pkl", "wb") as fh:
        pickle.dump(moved, fh)
    from pipeline.stages import logp

    logp.main(["--import_pickles", str(pickles), "--trust_pickles", "true", "--output_dir", str(out)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="Rows in the first batch.")
    cli = parser.parse_args()
    root = Path(cli.work or tempfile.mkdtemp(prefix="mismatch-bench-"))

    from pipeline.stages import ips, logp, prepare, sft
    from pipeline.tasks.synthetic import export_task
    from pipeline.tiny import make_tiny_model

    tiny = make_tiny_model(root / "tiny", seed=0, hidden_size=128, num_layers=4, intermediate_size=512)
    data = export_task(root / "task", num_problems=200, seed=0, responses_per_problem=2)
    model = root / "sft"
    sft.main(["--model_name_or_path", str(tiny), "--train_data", data["sft_train"], "--output_dir", str(model),
              "--learning_rate", "2e-3", "--max_steps", "150", "--per_device_train_batch_size", "16",
              "--max_length", str(cli.max_length), "--bf16", "false", "--dtype", "float32",
              *COMMON[:6], "--seed", "0"])  # fmt: skip
    prepared = root / "prepared"
    prepare.main(["--data_path", data["coderl_train"], "--output_dir", str(prepared), "--tokenizer_name_or_path",
                  str(model), "--eval_fraction", "0"])  # fmt: skip
    stores = {}
    for dtype in ("float32", "bfloat16"):
        stores[dtype] = root / f"logp_{dtype}"
        logp.main(["--data_path", str(prepared), "--model_name_or_path", str(model), "--max_length",
                   str(cli.max_length), "--dtype", dtype, "--output_dir", str(stores[dtype])])  # fmt: skip
    stores["stale"] = stale_store(stores["float32"], root / "logp_stale")

    cases = [("fp32 logps, fp32 training", "float32", "float32"), ("bf16 logps, fp32 training", "bfloat16", "float32"),
             ("fp32 logps, bf16 training", "float32", "bfloat16"), ("bf16 logps, bf16 training", "bfloat16", "bfloat16"),
             ("stale logps (same lengths), fp32", "stale", "float32")]  # fmt: skip
    for name, store, train_dtype in cases:
        out = root / f"ips_{store}_{train_dtype}"
        result = ips.main(["--data_path", str(prepared), "--model_name_or_path", str(model), "--logp_dir",
                           str(stores[store]), "--output_dir", str(out), "--max_length", str(cli.max_length),
                           "--dtype", train_dtype, "--bf16", "false", "--per_device_train_batch_size",
                           str(cli.batch), *COMMON])  # fmt: skip
        found = result["logp_mismatch"]
        print(json.dumps({"case": name, **{k: found[k] for k in ("mean_abs_log_ratio", "max_abs_log_ratio",
                                                                 "k3_kl", "tokens")}}), flush=True)  # fmt: skip
    if cli.work is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
