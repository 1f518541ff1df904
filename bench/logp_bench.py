"""Reference-logp throughput and peak memory: ours (token-budget batches, chunked lm_head) vs naive.

    .venv/bin/python bench/logp_bench.py                 # CPU: a small random Qwen2 (vocab 32k), ~1 min
    python bench/logp_bench.py --shape qwen0.5b           # GPU: the Qwen2.5-0.5B shape (`build` below)

Naive = right-padded batches of `--naive_batch` rows, full `[batch, seq, vocab]` fp32 log_softmax, gather.
Ours  = `pipeline.scoring`: length-sorted batches within a token budget, hidden states of response positions
only through lm_head in chunks, logsumexp. Packed = the same scoring on rows of `--token_budget` tokens
packed end to end (padding-free, position ids restarting per sample; `--attn flex_attention` on GPU). Same random-init model, same random token rows (log-normal
lengths), each variant in its own child process so peak memory is its own. Prints one JSON line per variant
and the largest difference between the two variants' log-probs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def build(shape: str, device: str, attn: str = "sdpa", fp32: bool = False):
    from transformers import AutoModelForCausalLM, Qwen2Config

    if shape == "qwen0.5b":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    else:
        cfg = Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" and not fp32 else torch.float32
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn).to(device).eval()


def samples(n: int, vocab: int, mean_log: float, max_len: int, prompt_len: int):
    from pipeline.tokenization import TokenizedSample

    rng = np.random.default_rng(1)
    lengths = np.clip(np.exp(rng.normal(mean_log, 0.7, n)), prompt_len + 8, max_len).astype(int)
    return [TokenizedSample(rng.integers(3, vocab, size=int(L)).tolist(), prompt_len, False) for L in lengths]


def naive(model, batch, device):
    from pipeline.scoring import collate

    ids, mask = collate(batch, 0, device)
    logps = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    return [logps[r, s.prompt_len - 1 : len(s.input_ids) - 1].gather(1, ids[r, s.prompt_len : len(s.input_ids), None])
            .squeeze(1) for r, s in enumerate(batch)]  # fmt: skip


def run_variant(args) -> dict:
    from pipeline.scoring import response_logps, token_budget_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.shape, device, args.attn if args.variant == "packed" else "sdpa", args.fp32)
    rows = samples(args.rows, model.config.vocab_size, args.mean_log, args.max_len, args.prompt_len)
    if args.variant == "packed":
        from pipeline.scoring import pack_rows, packed_response_logps

        batches = pack_rows([len(s.input_ids) for s in rows], args.token_budget)
        score = lambda batch: packed_response_logps(model, [batch], 0, args.chunk)  # noqa: E731
    elif args.variant == "naive":
        batches = [
            list(range(i, min(i + args.naive_batch, len(rows))))
            for i in range(0, len(rows), args.naive_batch)
        ]
        score = lambda batch: naive(model, batch, device)  # noqa: E731
    else:
        batches = token_budget_batches([len(s.input_ids) for s in rows], args.token_budget)
        score = lambda batch: response_logps(model, batch, 0, args.chunk)  # noqa: E731
    out = [None] * len(rows)
    with torch.inference_mode():
        score([rows[i] for i in batches[0]])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        for batch in batches:
            for i, values in zip(batch, score([rows[i] for i in batch]), strict=True):
                out[i] = values.float().cpu().numpy()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - start
    tokens = sum(len(s.input_ids) for s in rows)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30  # fmt: skip
    np.save(args.save, np.concatenate(out))
    return {"variant": args.variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "tokens_per_s": round(tokens / seconds), "seconds": round(seconds, 2), "rows": len(rows),
            "mean_len": round(tokens / len(rows)), "peak_gib": round(peak, 2),
            "peak_kind": "cuda allocated" if device == "cuda" else "process RSS"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["small", "qwen0.5b"], default="small")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument(
        "--mean_log", type=float, default=5.5, help="log-normal mean of lengths (6.0 ~ 505 tok)"
    )
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--naive_batch", type=int, default=8)
    parser.add_argument("--token_budget", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", choices=["naive", "ours", "packed"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--attn", default="sdpa", help="attention for the packed variant (flex_attention on GPU)"
    )
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--fp32", action="store_true", help="the model in fp32 on a GPU too (a reference)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results, arrays = [], []
    for variant in ("naive", "ours", "packed"):
        save = f"/tmp/logp_bench_{variant}.npy"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--save", save]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        arrays.append(np.load(save))
        print(line)
    for name, result, values in zip(("ours", "packed"), results[1:], arrays[1:], strict=True):
        print(json.dumps({
            f"{name}_vs_naive_speed": round(result["tokens_per_s"] / results[0]["tokens_per_s"], 2),
            f"{name}_vs_naive_peak_memory": round(result["peak_gib"] / results[0]["peak_gib"], 2),
            "max_abs_logp_diff": float(np.abs(arrays[0] - values).max()),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
