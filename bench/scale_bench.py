"""Peak memory and throughput of the data path at the users' scale: prepare, logp, IPS's and DPO's first step.

    .venv/bin/python bench/scale_bench.py [--rows 20000,200000] [--workdir /tmp/scale_bench]
        [--code_dir OTHER_CHECKOUT/src]   # the same measurements on another version of the code

Makes `--rows` synthetic logged code-RL rows in the users' schema (uid, a JSON chat prompt, a fenced code
response of ~80 bytes, `normalized_reward` in [-1, 1], 4 responses per prompt) and a tiny model, then runs
each stage in a fresh child process: `prepare` (rl and pairs views), `logp` (the tiny model as reference,
max_length 128), `ips` and `dpo` with the stored logps, one optimizer step each. A stage's peak RSS is the
largest of its own and its worker processes' (`ru_maxrss`); its time is measured inside the child,
after the imports. The table puts the sizes side by side with the ratio of the largest to the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pipeline.cli import STAGES
import importlib
stage, argv = sys.argv[1], sys.argv[2:]
main = importlib.import_module(STAGES[stage][0]).main
start = time.time()
main(argv)
seconds = time.time() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("BENCH " + json.dumps({"seconds": seconds, "peak_mib": peak / 1024}))
"""


def make_rows(path: Path, rows: int, chunk: int = 50_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("uid", pa.string()), ("prompt_pretokenized", pa.string()),
                        ("unprocessed_response", pa.string()), ("normalized_reward", pa.float64())])  # fmt: skip
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            ids = np.arange(start, min(rows, start + chunk))
            prompts = [json.dumps([{"role": "user", "content": f"Write add_{i // 4}(x) returning x plus {i // 4}."}])
                       for i in ids]  # fmt: skip
            responses = [f"```python\ndef add_{i // 4}(x):\n    y = x + {i % 97}\n    z = y * {i % 13}\n"
                         f"    return x + {i // 4 + i % 4}\n```" for i in ids]  # fmt: skip
            rewards = np.round(rng.uniform(-1, 1, len(ids)), 2)
            writer.write_table(pa.table([[f"u{i}" for i in ids], prompts, responses, rewards], schema=schema))


def run_stage(stage: str, argv: list[str], env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, stage, *argv], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")][-1]
    return json.loads(line[len("BENCH ") :])


def bench_size(rows: int, work: Path, model: Path, env: dict) -> dict[str, dict]:
    data = work / f"rows_{rows}.parquet"
    if not data.exists():
        make_rows(data, rows)
    out = work / f"run_{rows}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    prepared, store = out / "prepared", out / "logp"
    train = ["--bf16", "false", "--dtype", "float32", "--max_length", "128", "--max_steps", "1", "--report_to",
             "none", "--save_strategy", "no", "--eval_strategy", "no", "--per_device_train_batch_size", "8",
             "--gradient_checkpointing", "false", "--model_name_or_path", str(model), "--data_path", str(prepared)]  # fmt: skip
    results = {}
    results["prepare"] = run_stage("prepare", ["--data_path", str(data), "--output_dir", str(prepared), "--views",
                                               "rl,pairs", "--tokenizer_name_or_path", str(model)], env)  # fmt: skip
    results["logp"] = run_stage("logp", ["--data_path", str(prepared), "--model_name_or_path", str(model),
                                         "--max_length", "128", "--output_dir", str(store)], env)  # fmt: skip
    results["ips first step"] = run_stage(
        "ips", [*train, "--logp_dir", str(store), "--output_dir", str(out / "ips")], env
    )
    results["dpo first step"] = run_stage(
        "dpo", [*train, "--ref_logps_dir", str(store), "--output_dir", str(out / "dpo")], env
    )
    for name, result in results.items():
        result["rows_per_s"] = rows / result["seconds"]
        print(
            f"{rows:>9,} rows  {name:<15} {result['peak_mib']:8.0f} MiB  {result['seconds']:7.1f} s",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20000,200000", help="comma-separated sizes (default 20000,200000)")
    parser.add_argument("--workdir", default="/tmp/scale_bench")
    parser.add_argument("--code_dir", default=None, help="run another checkout's src/ instead of this one")
    args = parser.parse_args()
    sizes = [int(x) for x in args.rows.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = args.code_dir or str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "PIPELINE_CACHE_DIR": str(work / "cache")}  # fmt: skip
    model = work / "model"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "tiny-model", "--output_dir", str(model)], env=env,
                       check=True, capture_output=True)  # fmt: skip
    started = time.time()
    table = {size: bench_size(size, work, model, env) for size in sizes}
    lo, hi = sizes[0], sizes[-1]
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; code {src}; {time.time() - started:.0f} s"
    )
    print("| stage | " + " | ".join(f"peak RSS at {s:,} | rows/s at {s:,}" for s in sizes)
          + f" | RSS {hi:,} / {lo:,} | rows/s {hi:,} / {lo:,} |")  # fmt: skip
    print("|---|" + "---:|" * (2 * len(sizes) + 2))
    for name in table[lo]:
        cells = " | ".join(
            f"{table[s][name]['peak_mib']:,.0f} MiB | {table[s][name]['rows_per_s']:,.0f}" for s in sizes
        )
        ratio = table[hi][name]["peak_mib"] / table[lo][name]["peak_mib"]
        speed = table[hi][name]["rows_per_s"] / table[lo][name]["rows_per_s"]
        print(f"| {name} | {cells} | {ratio:.2f}× | {speed:.2f}× |")
    print(json.dumps({str(s): table[s] for s in sizes}))


if __name__ == "__main__":
    main()
