"""The report `pipeline check` prints."""

from __future__ import annotations

from pipeline.stages.check.memory import Estimate
from pipeline.stages.check.plan import Plan
from pipeline.stages.check.shape import GiB, ModelShape


def gib(value: float) -> str:
    return f"{value / GiB:,.2f}"


def render(result: dict, shape: ModelShape, plan: Plan, est: Estimate) -> str:
    lines = [f"pipeline check: {result['recipe']} (stage {plan.stage}, {result['stage_from']})"]
    lines += _model_and_setup(shape, plan, est)
    lines += _memory_table(est)
    lines += _verdict(result, est)
    return "\n".join(lines)


def _model_and_setup(shape: ModelShape, plan: Plan, est: Estimate) -> list[str]:
    p = est.params
    lines = []
    tied = "tied to the embedding" if shape.tied else f"{p['lm_head']:,}"
    how = (
        " (counted on the meta device)"
        if shape.counted_on_meta
        else " (from the formulas: transformers cannot build this config)"
    )
    lines += [
        f"model     {shape.path} ({shape.model_type}): {p['total']:,} parameters{how}",
        f"          embedding {p['embedding']:,} | attention {p['attention']:,} | mlp {p['mlp']:,} | "
        f"norms {p['norms']:,} | lm_head {tied}" + (f" | score head {p['score_head']:,}" if p["score_head"] else ""),
        f"          H {shape.hidden}, L {shape.layers}, heads {shape.heads}/{shape.kv_heads} kv, head dim "
        f"{shape.head_dim}, FFN {shape.intermediate}, vocab {shape.vocab}",
    ]  # fmt: skip
    train = f"{p['trained']:,} trained"
    if plan.use_peft:
        quant = (
            " on a 4-bit base (QLoRA)"
            if plan.load_in_4bit
            else " on an 8-bit base"
            if plan.load_in_8bit
            else ""
        )
        train += f" (LoRA r={plan.lora_r}{quant}: {100 * p['trained'] / max(p['models_total'], 1):.2f}%)"
    extra = {"copy": "reference: a frozen copy", "lora base": "reference: the LoRA base (adapter off, no copy)",
             "stored logps": "reference: stored log-probs (no model)", "none": "no reference model"}[plan.reference]  # fmt: skip
    if plan.stage == "ppo":
        extra += "; critic trained with the policy" + ("; reward model frozen" if plan.reward_model else "")
    lines += [
        f"setup     {plan.describe()}",
        f"          {train}; {extra}",
        f"batch     micro-batch {plan.micro_batch} × accumulation {plan.grad_accum} × {plan.num_gpus} "
        f"GPU{'s' if plan.num_gpus > 1 else ''} = "
        f"global batch {plan.global_batch}; {plan.train_sequences} sequences × {plan.seq_len} tokens per step; "
        f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        "",
    ]  # fmt: skip
    return lines


def _memory_table(est: Estimate) -> list[str]:
    lines = []
    unit, scale = ("GiB", GiB) if max(est.total, est.host_bytes) >= GiB else ("MiB", 1024**2)

    def size(value: float) -> str:
        return f"{value / scale:,.2f}"

    lines.append(f"{'memory per GPU':<38}{unit:>9}   formula")
    for item in est.items:
        lines.append(f"  {item.name:<36}{size(item.bytes):>9}   {item.formula}")
    peak = "activations + logits" if est.step_bytes >= est.generation_bytes else "KV cache"
    lines.append(f"  {'total (peak: ' + peak + ')':<36}{size(est.total):>9}")
    for item in est.host_items:
        lines.append(f"  host: {item.name:<30}{size(item.bytes):>9}   {item.formula}")
    if est.host_items:
        lines.append(f"  {'host memory per process':<36}{size(est.host_bytes):>9}")
    lines.append("")
    return lines


def _verdict(result: dict, est: Estimate) -> list[str]:
    """Fits or not on each GPU, the probe's measurement, the recommended batch or what would fit."""
    lines = []
    if not result["gpu_visible"]:
        lines.append("no GPU visible (torch.cuda.is_available() is False): estimate only, no probe step")
    for g in result["gpus"]:
        where = f"GPU {g['index']}" if g["index"] is not None else "planned GPU"
        verdict = "fits" if g["fits"] else "does NOT fit"
        lines.append(f"{where} {g['name']}: {gib(g['total_bytes'])} GiB total, budget {gib(g['budget_bytes'])} "
                     f"GiB: {verdict} (estimate {gib(est.total)} GiB)")  # fmt: skip
    if result["gpu_visible"] is False and not result["gpus"]:
        lines.append("compare with a GPU: --gpu_memory_gib 80")
    probe = result["probe"]
    if probe:
        if probe.get("skipped"):
            lines.append(f"probe: skipped: {probe['skipped']}")
        elif probe.get("out_of_memory"):
            lines.append(f"probe (GPU 0, one process, unsharded): out of memory at {probe['sequences']} × "
                         f"{probe['length']} tokens")  # fmt: skip
        else:
            lines.append(
                f"probe (GPU 0, one process, unsharded, {probe['sequences']} × {probe['length']} tokens): peak "
                f"{gib(probe['peak_allocated_bytes'])} GiB allocated, {gib(probe['peak_reserved_bytes'])} GiB "
                f"reserved (estimate {gib(probe['estimate_single_gpu_bytes'])} GiB); {probe['step_seconds']:.3f} "
                f"s/step, {probe['tokens_per_second']:,.0f} tokens/s"
            )
    rec = result["recommendation"]
    if rec:
        lines.append(
            f"recommended: per_device_train_batch_size {rec['per_device_train_batch_size']}, "
            f"gradient_accumulation_steps {rec['gradient_accumulation_steps']} (global batch {rec['global_batch']} "
            f"unchanged; {gib(rec['estimate_bytes'])} GiB per GPU)"
        )
    elif result["gpus"]:
        lines.append("does not fit even at micro-batch 1" + (":" if result["alternatives"] else ""))
        lines += [f"  {a}" for a in result["alternatives"]]
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return lines
