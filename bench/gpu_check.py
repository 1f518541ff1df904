"""Every performance question at once, on the machine it runs on: `bash bench/gpu_check.sh` (see there).

GPU mode (CUDA visible): a random-init Qwen2.5-0.5B shape (hidden 896, 24 layers, 14/2 heads, FFN 4864,
vocab 151936, tied embeddings) on random rows with log-normal lengths (mean ~505, max 2048).
Smoke mode (no GPU): a small Qwen2 shape on short rows, a few steps: the same lines, so CI keeps it working.

Writes `<out>/env.json` (GPU, torch, CUDA, flash-attn / flex_attention availability, versions) and
`<out>/results.jsonl`, one JSON object per line: `variant`, `tokens_per_s`, `peak_gib` (CUDA allocated on a
GPU, process RSS on a CPU), and for the scoring variants `max_abs_diff` against an fp32 full-vocabulary
reference; `target` and `meets_target` where the issue sets one (GPU mode only). On a GPU each variant
runs in its own child process, so each peak is its own (see `in_child`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
QWEN_05B = {
    "hidden_size": 896,
    "num_layers": 24,
    "num_heads": 14,
    "num_kv_heads": 2,
    "intermediate_size": 4864,
}
SMALL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}
TARGETS = {"logp ours packed": 300_000, "sft ours": 120_000, "ips ours": 120_000}  # tokens/s on the GPU


def peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def environment(gpu: bool) -> dict:
    import importlib.util

    import torch
    import transformers
    import trl

    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        flex = True
    except ImportError:
        flex = False
    return {"mode": "gpu" if gpu else "smoke", "gpu": torch.cuda.get_device_name() if gpu else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "trl": trl.__version__, "flash_attn": importlib.util.find_spec("flash_attn") is not None,
            "flex_attention": flex, "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"}  # fmt: skip


def in_child(gpu: bool, index: int) -> bool:
    """Whether variant ``index`` of a kind runs in a child process: every one on a GPU (each CUDA peak its
    own); in the CPU smoke mode only the first of each kind, so both command lines stay tested while the
    rest skip a child's ~8 s of imports. Their peaks are then this process's running maximum RSS: smoke
    figures, not measurements."""
    return gpu or index == 0


def build_workspace(work: Path, gpu: bool) -> dict:
    """The model (Qwen2.5-0.5B shape on a GPU, with the full vocabulary), code-RL rows with log-normal
    response lengths, prepared and scored by `pipeline logp` (the IPS variant's input), and SFT chats."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages import logp, prepare
    from pipeline.tiny import make_tiny_model

    shape = QWEN_05B if gpu else SMALL
    model_dir = make_tiny_model(work / "model_small_vocab", seed=0, **shape)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if gpu:
        model.resize_token_embeddings(151936)  # the lm_head and softmax of the real vocabulary
    model.save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(work / "model")
    rng = np.random.default_rng(0)
    rows, mean_log, cap = (1024, 6.0, 1900) if gpu else (96, 3.5, 120)
    lengths = np.clip(np.exp(rng.normal(mean_log, 0.7, rows)), 8, cap).astype(int)
    words = ["x", "y", "value", "total", "return", "def", "for", "in", "range", "if", "else", "+", "-", "*"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in lengths]
    table = pa.table({
        "uid": [f"r{i}" for i in range(rows)],
        "prompt_pretokenized": [json.dumps([{"role": "user", "content": f"task {i}"}]) for i in range(rows)],
        "unprocessed_response": texts,
        "normalized_reward": rng.choice([-1.0, 1.0], size=rows),
    })  # fmt: skip
    pq.write_table(table, work / "rows.parquet")
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": f"task {i}"},
                                           {"role": "assistant", "content": t}] for i, t in enumerate(texts)]}),
                   work / "sft.parquet")  # fmt: skip
    max_length = 2048 if gpu else 160
    prepare.main(["--data_path", str(work / "rows.parquet"), "--output_dir", str(work / "prepared"), "--overwrite",
                  "true", "--eval_fraction", "0", "--views", "rl"])  # fmt: skip
    logp.main(["--data_path", str(work / "prepared"), "--model_name_or_path", str(work / "model"), "--max_length",
               str(max_length), "--splits", "train", "--output_dir", str(work / "logp")])  # fmt: skip
    return {"model": str(work / "model"), "max_length": max_length, "rows": rows}


def train_variant(name: str, work: Path, gpu: bool) -> dict:
    """One training variant in this process: tokens/s over the training time, and the peak."""
    from pipeline.stages import ips, sft

    info = json.loads((work / "workspace.json").read_text())
    steps, batch = (30, 8) if gpu else (4, 4)
    common = ["--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--report_to", "none",
              "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", str(steps), "--max_length",
              str(info["max_length"]), "--include_num_input_tokens_seen", "non_padding", "--bf16", str(gpu).lower(),
              "--dtype", "bfloat16" if gpu else "float32", "--output_dir", str(work / "runs" / name.replace(" ", "_"))]  # fmt: skip
    model = ["--model_name_or_path", info["model"]]
    if name == "sft trl defaults":  # TRL's defaults for everything else (gradient checkpointing, padding)
        result = sft.main([*model, "--train_data", str(work / "sft.parquet"), *common])
    elif name == "sft ours":  # packed, no checkpointing
        result = sft.main([*model, "--train_data", str(work / "sft.parquet"), "--packing", "true",
                           "--gradient_checkpointing", "false", *common])  # fmt: skip
    else:  # ips ours: padding-free batches, no checkpointing
        result = ips.main([*model, "--data_path", str(work / "prepared"), "--logp_dir", str(work / "logp"),
                           "--padding_free", "true", "--gradient_checkpointing", "false", *common])  # fmt: skip
    final = next(h for h in reversed(result["log_history"]) if "train_runtime" in h)
    tokens, seconds = final.get("num_input_tokens_seen"), final["train_runtime"]
    return {"variant": name, "tokens_per_s": round(tokens / seconds) if tokens and seconds else None,
            "peak_gib": round(peak_gib(), 3), "steps": steps, "batch": batch}  # fmt: skip


def child_json(cmd: list[str]) -> dict:
    """Run a variant's child process; its result is the JSON object on the last line it prints."""
    return json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )


def scoring_variants(work: Path, gpu: bool) -> list[dict]:
    """bench/logp_bench.py's variants, each in a child, and their distance to an fp32 naive reference."""
    import numpy as np

    shape = ["--shape", "qwen0.5b", "--rows", "128", "--mean_log", "6.0", "--max_len", "2048"] if gpu else \
        ["--shape", "small", "--rows", "24", "--mean_log", "4.0", "--max_len", "256", "--token_budget", "1024"]  # fmt: skip
    names = {"naive": "logp naive (fp32 log-softmax, padded batch 8)", "ours": "logp ours padded",
             "packed": "logp ours packed" + (" + flex_attention" if gpu else "")}  # fmt: skip
    runs = [("reference", ["--variant", "naive", "--fp32"])] + [(v, ["--variant", v]) for v in names]
    saved, rows = {}, []
    for index, (key, flags) in enumerate(runs):
        path = work / f"logp_{key}.npy"
        attn = ["--attn", "flex_attention"] if key == "packed" and gpu else []
        argv = [*shape, *flags, *attn, "--save", str(path)]
        if in_child(gpu, index):
            result = child_json([sys.executable, str(HERE / "logp_bench.py"), *argv])
        else:
            import logp_bench  # bench/ is on sys.path: this script runs from there

            result = logp_bench.run_variant(logp_bench.build_parser().parse_args(argv))
        saved[key] = np.load(path)
        if key != "reference":
            rows.append({"variant": names[key], "tokens_per_s": result["tokens_per_s"], "peak_gib": result["peak_gib"],
                         "max_abs_diff": float(np.abs(saved[key] - saved["reference"]).max())})  # fmt: skip
    return rows


def check_prediction(work: Path, gpu: bool, measured: dict) -> dict:
    """`pipeline check`'s predicted peak for the IPS variant beside the measured one (on a CPU the measured
    figure is the process RSS: not the same quantity)."""
    from pipeline.stages import check

    info = json.loads((work / "workspace.json").read_text())
    recipe = work / "ips_check.yaml"
    recipe.write_text(f"model_name_or_path: {info['model']}\nper_device_train_batch_size: {measured['batch']}\n"
                      f"max_length: {info['max_length']}\ngradient_checkpointing: false\n"
                      f"dtype: {'bfloat16' if gpu else 'float32'}\nbf16: {str(gpu).lower()}\n")  # fmt: skip
    result = check.main(["--config", str(recipe), "--stage", "ips", "--num_gpus", "1", "--probe", "false"])
    return {"variant": "check predicted peak (ips)", "tokens_per_s": None,
            "peak_gib": round(result["total_bytes"] / 2**30, 3), "measured_peak_gib": measured["peak_gib"],
            "measured_kind": "cuda allocated" if gpu else "process RSS (CPU)"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for env.json and results.jsonl")
    parser.add_argument("--work", default=None, help="scratch folder (default: <out>/work)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    out = Path(args.out)
    work = Path(args.work or out / "work")
    if args.child:
        print(json.dumps(train_variant(args.child, work, gpu)))
        return
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    (out / "env.json").write_text(json.dumps(environment(gpu), indent=2) + "\n")
    (work / "workspace.json").write_text(json.dumps(build_workspace(work, gpu)))
    results = scoring_variants(work, gpu)
    for index, name in enumerate(("sft trl defaults", "sft ours", "ips ours")):
        if in_child(gpu, index):
            results.append(
                child_json(
                    [sys.executable, __file__, "--out", str(out), "--work", str(work), "--child", name]
                )
            )
        else:
            results.append(train_variant(name, work, gpu))
    results.append(check_prediction(work, gpu, results[-1]))
    with open(out / "results.jsonl", "w") as f:
        for row in results:
            target = TARGETS.get(row["variant"].split(" +")[0]) if gpu else None
            if target is not None:
                row.update(target=target, meets_target=(row["tokens_per_s"] or 0) >= target)
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"gpu_check: {len(results)} results in {out / 'results.jsonl'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
