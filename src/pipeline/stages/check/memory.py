"""The memory model: weights, gradients, optimizer states, activations per GPU; the micro-batch that fits."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.stages.check.plan import Plan
from pipeline.stages.check.shape import (
    DTYPE_BYTES,
    Counts,
    GiB,
    Linear,
    ModelShape,
    count_params,
    lora_params,
    lora_targets,
)

RESERVE_BYTES = 1 * GiB


FRAGMENTATION = 0.05


def activation_bytes_per_token_layer(
    shape: ModelShape, e: int, lora: list[Linear] | None = None, r: int = 0, dropout: float = 0.0
) -> int:
    """A of the module docstring: bytes one token keeps for backward in one decoder layer. `lora`: the
    adapted linears when the base is frozen (LoRA), None for full training."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = e * (2 * q + 2 * kv) + 4 * shape.heads
    frozen = lora is not None
    if not shape.gated_mlp:
        mlp = e * (1 if frozen else 2) * shape.intermediate
    else:
        mlp = e * (3 if frozen else 4) * shape.intermediate
    adapters = sum(4 * r for li in lora or [])  # lora_A's fp32 output, kept by lora_B
    if dropout > 0:  # each adapter's dropout output (fp32) and its mask (bool on CUDA)
        adapters += sum(5 * li.fan_in for li in lora or [])
    elif e == 2:  # each adapter keeps its own fp32 copy of its 16-bit input
        adapters += sum(4 * li.fan_in for li in lora or [])
    else:  # fp32: adapters keep the layer's own tensors, once per distinct input (attention output: kept)
        fan_in = {li.source: li.fan_in for li in lora or [] if li.source != "attn_out"}
        adapters += sum(e * v for v in fan_in.values())
    return 2 * norm_bytes_per_token(shape, e, frozen) + attention + mlp + adapters


def norm_bytes_per_token(shape: ModelShape, e: int, frozen: bool = False) -> int:
    """One norm, per token. RMSNorm (transformers computes it in fp32) keeps its fp32 input and 1/rms, and
    with a trained weight also the normalised value cast back and the scaled output (the next linear's
    input); LayerNorm keeps its input, mean and 1/std, and the output when the next linear is trained."""
    if shape.layernorm:
        return (1 if frozen else 2) * e * shape.hidden + 8
    return (4 if frozen else 4 + 2 * e) * shape.hidden + 4


@dataclass
class Item:
    name: str
    bytes: int
    formula: str


@dataclass
class Estimate:
    items: list[Item]
    host_bytes: int
    host_items: list[Item]
    persistent_bytes: int
    step_bytes: int  # activations + logits (backward pass)
    generation_bytes: int  # KV cache (rollout, outside the backward pass)
    params: dict[str, int]
    notes: list[str]

    @property
    def total(self) -> int:
        return self.persistent_bytes + max(self.step_bytes, self.generation_bytes)


def _frozen_bytes(counts: Counts, plan: Plan, m: int, w: int) -> float:
    """Bytes of a frozen model's weights on one device before sharding: 4/8-bit decoder linears, the rest in
    the loaded dtype (DeepSpeed casts its module to 16 bits under mixed precision)."""
    rest = counts.total - counts.score_head - counts.linear_weights
    if plan.load_in_4bit:
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if plan.nested_quant else 4 / 64)
        return counts.linear_weights * per_weight + rest * w
    if plan.load_in_8bit:
        return counts.linear_weights + 4 * counts.linear_rows + rest * w
    return (counts.linear_weights + rest) * (m if plan.engine == "deepspeed" else w)


@dataclass
class _Trained:
    """The trained modules (the policy or reward model, plus ppo's critic) and what they weigh."""

    policy: Counts
    modules: list[tuple[ModelShape, Counts]]
    lora_by_module: list[list[Linear]]
    trained: float  # parameters that get gradients
    frozen_bytes: float  # the frozen LoRA bases, before sharding
    models_total: int


def _trained_modules(shape: ModelShape, plan: Plan, critic: ModelShape | None, m: int, w: int) -> _Trained:
    policy = count_params(shape, classifier=plan.stage == "rm")
    modules = [(shape, policy)]
    if plan.stage == "ppo" and not plan.policy_only:
        modules.append((critic or shape, count_params(critic or shape, classifier=True)))
    out = _Trained(policy, modules, [], 0.0, 0.0, 0)
    for mod_shape, counts in modules:
        targets = lora_targets(mod_shape, plan.lora_target_modules) if plan.use_peft else []
        out.lora_by_module.append(targets)
        out.models_total += counts.total
        if plan.use_peft:
            adapters = lora_params(mod_shape, plan.lora_r, targets)
            out.models_total += adapters
            out.trained += adapters + counts.score_head  # the score head is trained in full (modules_to_save)
            out.frozen_bytes += _frozen_bytes(counts, plan, m, w)
        else:
            out.trained += counts.total
    return out


def _bytes_per_trained_param(plan: Plan, mp: bool, m: int, w: int, notes: list[str]) -> tuple[int, int, int]:
    """Bytes per trained parameter: weights, gradients, optimizer (fp32 master + AdamW m, v)."""
    moments = 2 if "8bit" in plan.optim else 8
    if plan.engine == "deepspeed":
        return m, m, (4 if mp else 0) + moments
    if plan.engine == "fsdp":
        return 4, 4, moments
    tw = 4 if plan.use_peft else w
    if tw == 2 and mp:
        notes.append(
            "weights loaded in 16 bits train in pure 16-bit without DeepSpeed/FSDP (AdamW moments in 16 "
            "bits, no fp32 master copy); dtype: float32 gives mixed precision at 16 bytes per parameter"
        )
    return tw, tw, moments if tw == 4 else (2 if "8bit" in plan.optim else 2 * tw)


class _Items:
    """The lines of the estimate, on the device or (offloaded) on the host."""

    def __init__(self) -> None:
        self.device: list[Item] = []
        self.host: list[Item] = []

    def add(self, name: str, value: float, formula: str, on_host: bool = False) -> None:
        (self.host if on_host else self.device).append(Item(name, int(round(value)), formula))


def _per(shard: int) -> str:
    return f" / {shard}" if shard > 1 else ""


def estimate(shape: ModelShape, plan: Plan, critic: ModelShape | None = None,
             reward: ModelShape | None = None) -> Estimate:  # fmt: skip
    """Bytes per device for `plan` (see the module docstring for every formula)."""
    w = DTYPE_BYTES[plan.dtype]
    mp = plan.mixed_precision != "no"
    m = 2 if mp else w  # 16-bit copies under mixed precision
    e = 2 if (mp or w == 2) else 4
    notes: list[str] = []
    model = _trained_modules(shape, plan, critic, m, w)
    items = _Items()
    _add_persistent(items, shape, plan, model, _bytes_per_trained_param(plan, mp, m, w, notes), m, w, reward)
    persistent = sum(i.bytes for i in items.device)
    step = _add_step(items, plan, model, e, shape.vocab)
    generation = 0
    if plan.generation_batch and not plan.policy_only:
        kv = shape.kv_heads * shape.head_dim
        length = plan.prompt_len + plan.completion_len
        generation = 2 * shape.layers * kv * e * plan.generation_batch * length
        items.add("generation KV cache", generation,
                  f"2·L·{kv}·{e} B × {plan.generation_batch} sequences × {length} tokens (not during backward)")  # fmt: skip
    policy = model.policy
    params = {
        "embedding": policy.embedding, "attention": policy.attention, "mlp": policy.mlp, "norms": policy.norms,
        "lm_head": policy.lm_head, "score_head": policy.score_head, "total": policy.total,
        "trained": int(model.trained), "models_total": int(model.models_total),
    }  # fmt: skip
    return Estimate(
        items=items.device, host_bytes=sum(i.bytes for i in items.host), host_items=items.host,
        persistent_bytes=persistent, step_bytes=step, generation_bytes=generation, params=params, notes=notes,
    )  # fmt: skip


def _add_persistent(items: _Items, shape: ModelShape, plan: Plan, model: _Trained, per_param: tuple[int, int, int],
                    m: int, w: int, reward: ModelShape | None) -> None:  # fmt: skip
    """What stays on the device for the whole run: weights, gradients, optimizer states, buffers, the frozen
    models beside the trained one."""
    n = plan.num_gpus
    z = plan.zero if plan.engine == "deepspeed" else None
    sharded_params = z == 3 or plan.engine == "fsdp"
    shard_w = n if sharded_params else 1
    shard_g = n if ((z is not None and z >= 2) or plan.engine == "fsdp") else 1
    shard_o = n if ((z is not None and z >= 1) or plan.engine == "fsdp") else 1
    tw, tg, to = per_param
    trained, policy = model.trained, model.policy
    n_trained = f"{trained / 1e6:,.2f}M trained"
    params_on_host = plan.offload and sharded_params
    grads_on_host = plan.offload and (plan.engine == "fsdp" or (z or 0) >= 2)
    if plan.use_peft:
        items.add("frozen base weights", model.frozen_bytes / shard_w, _frozen_formula(plan, m, w) + _per(shard_w),
                  on_host=params_on_host)  # fmt: skip
    items.add("trained weights", trained * tw / shard_w, f"{tw} B × {n_trained}{_per(shard_w)}",
              on_host=params_on_host)  # fmt: skip
    items.add(
        "gradients", trained * tg / shard_g, f"{tg} B × {n_trained}{_per(shard_g)}", on_host=grads_on_host
    )
    master = "4 master + " if plan.engine == "deepspeed" and plan.mixed_precision != "no" else ""
    items.add("optimizer states", trained * to / shard_o,
              f"({master}{to - (4 if master else 0)} AdamW m, v) B × {n_trained}{_per(shard_o)}",
              on_host=plan.offload)  # fmt: skip
    if plan.offload and plan.engine == "deepspeed":
        items.add("fp32 gradient partitions", trained * 4 / n, f"4 B × {n_trained}{_per(n)}", on_host=True)
    if plan.engine == "ddp":
        items.add("DDP gradient buckets", trained * tg, f"{tg} B × {n_trained}")
    elif plan.engine == "deepspeed":
        buckets = (2 + (0.9 if z == 3 else 0)) * shape.hidden**2 * m
        items.add("DeepSpeed buckets", buckets, f"{'2.9' if z == 3 else '2'} × H² × {m} B")
    elif plan.engine == "fsdp":
        items.add("FSDP reduce-scatter buffer", policy.per_layer * 4, "4 B × one decoder layer's parameters")
    if sharded_params:
        gathered = m * (policy.embedding + policy.lm_head + 2 * policy.per_layer)
        items.add(
            "gathered 16-bit working set", gathered, f"{m} B × (embedding + lm_head + 2 decoder layers)"
        )

    # frozen models beside the trained one (TRL shards them with ZeRO-3/FSDP; our ppo keeps them whole)
    side_shard = shard_w if plan.stage != "ppo" else 1
    if plan.reference == "copy" and not plan.policy_only:
        ref = count_params(shape)
        items.add("reference model", _frozen_bytes(ref, plan, m, w) / side_shard,
                  f"frozen copy of {ref.total / 1e6:,.2f}M parameters{_per(side_shard)}")  # fmt: skip
    if plan.reward_model and not plan.policy_only:
        rm = count_params(reward or shape, classifier=True)
        items.add("reward model", rm.total * w / side_shard,
                  f"{w} B × {rm.total / 1e6:,.2f}M parameters{_per(side_shard)}")  # fmt: skip


def _add_step(items: _Items, plan: Plan, model: _Trained, e: int, vocab: int) -> int:
    """One micro-batch: the activations kept for backward and the logits. Returns their bytes."""
    tokens = plan.train_sequences * plan.seq_len
    step = 0
    for index, ((mod_shape, _), targets) in enumerate(zip(model.modules, model.lora_by_module, strict=True)):
        lora = targets if plan.use_peft else None
        a = activation_bytes_per_token_layer(mod_shape, e, lora, plan.lora_r, plan.lora_dropout)
        outside = norm_bytes_per_token(mod_shape, e, frozen=plan.use_peft) + 8  # final norm, int64 token ids
        if plan.gradient_checkpointing:
            act = tokens * (mod_shape.layers * e * mod_shape.hidden + a + outside)
            formula = f"{tokens:,} tokens × (L·{e}·H + A + {outside:,}), A = {a:,} B"
        else:
            act = tokens * (mod_shape.layers * a + outside)
            formula = f"{tokens:,} tokens × (L·A + {outside:,}), A = {a:,} B"
        items.add("activations" if index == 0 else "critic activations", act, formula)
        step += int(act)
    logit_bytes = plan.logit_tokens * vocab * (e + 8)
    if logit_bytes:
        items.add("logits", logit_bytes, f"{plan.logit_tokens:,} tokens × V × ({e} + 4 + 4) B")
    return step + logit_bytes


def _frozen_formula(plan: Plan, m: int, w: int) -> str:
    if plan.load_in_4bit:
        nested = "0.5 + 1/64 + 4/16384" if plan.nested_quant else "0.5 + 4/64"
        return f"4-bit linears ({nested} B), the rest {w} B × base parameters"
    if plan.load_in_8bit:
        return f"8-bit linears (1 B + 4 B per row), the rest {w} B × base parameters"
    return f"{m if plan.engine == 'deepspeed' else w} B × base parameters"


def budget_bytes(total_bytes: int) -> int:
    return int(total_bytes * (1 - FRAGMENTATION) - RESERVE_BYTES)


def recommend(shape, plan, budget, critic=None, reward=None, offset: int = 0) -> dict[str, Any] | None:
    """Largest micro-batch dividing micro-batch × accumulation whose estimate (+ `offset`) fits `budget`."""
    per_device = plan.micro_batch * plan.grad_accum
    for micro in sorted((d for d in range(1, per_device + 1) if per_device % d == 0), reverse=True):
        # (the rollout size, micro-batch × accumulation [× mini-batches], stays as it is)
        trial = replace(plan, micro_batch=micro, grad_accum=per_device // micro, notes=[])
        total = estimate(shape, trial, critic, reward).total + offset
        if total <= budget:
            return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": per_device // micro,
                    "global_batch": plan.global_batch, "estimate_bytes": total}  # fmt: skip
    return None


def alternatives(shape, plan, budget, critic=None, reward=None) -> list[str]:
    """Setups that fit at micro-batch 1 when the plan does not (cheapest change first)."""
    trials = []
    if not plan.gradient_checkpointing:
        trials.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    for z in (2, 3):
        if (
            (plan.zero or 0) < z
            and plan.engine != "fsdp"
            and plan.num_gpus > 1
            and not (plan.stage == "ppo" and z == 3)
        ):
            trials.append((f"--zero {z} (accelerate_configs/deepspeed_zero{z}.yaml)",
                           {"engine": "deepspeed", "zero": z, "gradient_checkpointing": True}))  # fmt: skip
    if plan.stage != "ppo":
        trials.append(("--zero 3 --offload (accelerate_configs/deepspeed_zero3_offload.yaml)",
                       {"engine": "deepspeed", "zero": 3, "offload": True, "gradient_checkpointing": True}))  # fmt: skip
    if not plan.use_peft:
        trials.append(("use_peft: true (LoRA)", {"use_peft": True, "gradient_checkpointing": True}))
    out = []
    for label, change in trials:
        trial = replace(
            plan, micro_batch=1, grad_accum=plan.micro_batch * plan.grad_accum, notes=[], **change
        )
        total = estimate(shape, trial, critic, reward).total
        if total <= budget:
            out.append(f"{label}: {total / GiB:.1f} GiB at micro-batch 1")
    return out
