"""Will this recipe fit? Memory per device of a training stage, estimated before the cluster run.

    pipeline check --config recipes/qwen/dpo.yaml --num_gpus 8 --zero 2
    pipeline check --config recipe.yaml --stage sft --fsdp --num_gpus 16 --output_json check.json
    pipeline check --config recipe.yaml --zero 3 --offload --gpu_memory_gib 80   # plan for a GPU not here

Reads a recipe of any training stage (sft, ips, dpo, rm, grpo, rloo, ppo; the stage comes from `--stage`,
else the file name, else the recipe's keys) and the model's local `config.json`, counts the parameters
exactly, estimates the bytes each GPU holds, compares them with every visible GPU's total memory and, on
a GPU, runs one probe step of the real model at the configured micro-batch and length (peak memory, step
time). It prints a table, a recommended micro-batch and gradient accumulation that keep the global batch,
and writes everything as JSON with `--output_json`. Without a GPU it says so and prints the estimate.

Recipe keys read (others are ignored): model_name_or_path, dtype, bf16, fp16, per_device_train_batch_size,
gradient_accumulation_steps, max_length, max_prompt_length, max_completion_length, max_new_tokens,
gradient_checkpointing, optim, use_peft, lora_r, lora_target_modules, lora_dropout, load_in_4bit,
load_in_8bit, use_bnb_nested_quant, beta, ref_model_name_or_path, ref_logps_dir, precompute_ref_log_probs,
reward_funcs, reward_model_path, value_model_path, num_mini_batches, steps_per_generation, use_vllm,
deepspeed (a DeepSpeed JSON: ZeRO stage and offload) and fsdp. Flags override them.

Parameter count (exact; checked against the instantiated models in the tests). H hidden size, L layers,
V vocabulary, I intermediate size, a query heads, k key/value heads, d head dim (head_dim or H/a):
    embedding   V·H
    attention   per layer H·a·d (q) + 2·H·k·d (k, v: grouped-query attention) + a·d·H (o)
                + biases (Qwen2: q, k, v; Llama/Qwen3/Gemma `attention_bias`: q, k, v, o; GPT-NeoX: all)
                + 2·d for Qwen3's q/k norms
    mlp         per layer 3·H·I (gate, up, down; GPT-NeoX: 2·H·I + biases I + H)
    norms       per layer 2·H (RMSNorm; LayerNorm with bias 4·H) + H for the final norm (2·H LayerNorm)
    lm_head     V·H, or 0 when tie_word_embeddings; a reward model / critic has a score head H instead
Other model types are counted by instantiating the config on the meta device (no memory, still exact).
LoRA adds r·(in + out) per targeted linear per layer ("all-linear": every linear of the decoder layers;
unset: PEFT's default targets for the model type).

Memory per device, bytes. P parameters of the trained model, T of them trained (all, or the LoRA adapters),
F = P − T frozen, N processes (`--num_gpus`), w the loaded dtype's bytes (recipe `dtype`: float32 4,
bfloat16/float16 2), m = 2 with bf16/fp16 mixed precision (w without it), e = activation bytes (2 with
16-bit compute, else 4):
    plain / DDP     weights w·F + w'·T, gradients w'·T, AdamW m and v 2·w'·T (w' = 4 for LoRA adapters,
                    which PEFT keeps in fp32, else w). fp32 weights under autocast are their own master copy
                    (16 bytes per trained parameter); a model loaded in bf16 trains in pure bf16 (8 bytes,
                    no fp32 master copy). DDP adds its gradient buckets, w'·T.
    DeepSpeed ZeRO  weights m·P, gradients m·T, optimizer (4 master + 4 + 4 for m and v) = 12·T under mixed
                    precision (8·T in fp32) — the ZeRO paper's 2 + 2 + 12 = 16 bytes per parameter.
                    ZeRO-1 divides the optimizer by N, ZeRO-2 also the gradients, ZeRO-3 also the weights.
                    Buckets: 2·H²·m (reduce, double-buffered), plus 0.9·H²·m prefetch for ZeRO-3.
    FSDP2           fp32 shards of the trained parameters (accelerate upcasts them): (4 + 4 + 8)·T / N,
                    frozen ones w·F / N; buckets: one layer's fp32 gradients before reduce-scatter.
    ZeRO-3 / FSDP   gathered 16-bit working set: m·(embedding + lm_head + 2 decoder layers).
    --offload       ZeRO-1/2: the optimizer states and fp32 gradient partitions (4·T/N) live in host
                    memory; ZeRO-3 also the parameter shards (m·P/N); FSDP: parameters, gradients, optimizer.
    4-bit (QLoRA)   the decoder's linear weights take 0.5 + 4/64 bytes (an fp32 absmax per 64 values;
                    0.5 + 1/64 + 4/16384 with use_bnb_nested_quant); 8-bit: 1 byte + 4 per output row;
                    everything else stays in w bytes.
    8-bit optimizer (optim containing "8bit"): m and v take 1 byte each.
    reference model a frozen copy (DPO; GRPO/RLOO with beta > 0; PPO): the frozen-weight rule above (TRL
                    wraps it in ZeRO-3 / FSDP too; under ZeRO-0/1/2 it is a whole copy per GPU). None with LoRA
                    (the base with the adapter off), with stored reference logps (DPO `ref_logps_dir`,
                    `precompute_ref_log_probs`) and for IPS (logps read from disk).
    PPO             policy and critic are trained as one module (the critic is a sequence classifier from
                    value_model_path, else reward_model_path, else the policy's shape); the reward model is a
                    frozen copy in w bytes.
    activations     bytes autograd keeps per token per decoder layer (SDPA/flash attention: no a·s² scores):
                      A = 2·((4 + 2e)·H + 4)   two RMSNorms (computed in fp32): fp32 input, 1/rms, the
                                               normalised value cast back, the scaled output
                        + e·(2·a·d + 2·k·d)    q and k after RoPE, v, the attention output
                        + 4·a                  attention log-sum-exp (fp32, per head)
                        + 4·e·I                SwiGLU: gate, up, silu(gate), their product (GELU MLP: 2·e·I)
                    LoRA (frozen base): the norms keep 4·H + 4 each, the MLP 3·e·I (GELU: e·I), and each
                    adapted linear adds 4·r (lora_A's fp32 output) plus its input: a fp32 copy 4·in with a
                    16-bit base, the shared input e·in once per distinct input with an fp32 base, or the
                    dropout output and bool mask 5·in with lora_dropout > 0 (CUDA; CPU keeps a float mask).
                    Outside the layers: the final norm ((4 + 2e)·H + 4; LoRA 4·H + 4) and 8 for the token id.
                    Without gradient checkpointing: tokens·(L·A + outside); with it (one checkpoint per
                    layer, non-reentrant): tokens·(L·e·H + A + outside), A being the layer recomputed in
                    backward. Checked against the tensors autograd saves for the tiny model (within 1%).
                    LayerNorm models (GPT-NeoX) keep 2·e·H + 8 per norm (LoRA e·H + 8).
                    tokens = sequences × length per micro-batch: sft/ips b·max_length, dpo/rm 2b·max_length
                    (chosen and rejected), grpo/rloo/ppo b·(prompt + completion); ppo adds the critic's.
    logits          logit tokens·V·(e + 4 + 4): the lm_head output, the fp32 log-softmax kept for backward
                    and its fp32 gradient (the b·s·V·4-byte buffers). Logit tokens: the completion only for
                    grpo/rloo; none for a reward model or the critic.
    generation      grpo/rloo (without vLLM) and ppo rollouts hold a KV cache 2·L·k·d·e·B·(prompt +
                    completion) for the B sequences generated at once (b × steps_per_generation, default
                    gradient_accumulation_steps; ppo: b × gradient_accumulation_steps × num_mini_batches).
                    It exists outside the backward pass, so the peak counts max(activations + logits, KV cache).
The comparison budget of a GPU is 0.95 × its total memory − 1 GiB (allocator fragmentation; the CUDA context
and NCCL buffers, which torch does not count). The recommended micro-batch is the largest divisor of
micro-batch × gradient accumulation whose estimate fits that budget (after a probe: the estimate plus the
probe's measured-minus-estimated difference); accumulation takes the rest, so the global batch is unchanged.
The probe runs one process on GPU 0 without sharding (ZeRO/FSDP need several processes): it loads the
model as the recipe says (dtype, 4/8-bit, LoRA, gradient checkpointing), runs two AdamW steps on random
tokens (the policy only: no reference, critic or reward model) and reports the peak allocated and
reserved memory, and the second step's time. It is skipped when the unsharded weights, gradients and
optimizer states alone exceed GPU 0, and reported as out of memory when the step does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.data import read_json_object
from pipeline.errors import PipelineError

GiB = 1024**3
STAGES = ("sft", "ips", "dpo", "rm", "grpo", "rloo", "ppo")
# defaults of the stages' config classes (TRL 1.16 SFTConfig/DPOConfig/RewardConfig/GRPOConfig/RLOOConfig,
# our IPSConfig and PPOStageConfig); the tests pin these against the classes
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None},
    "ips": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None},
    "dpo": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None, "beta": 0.1},
    "rm": {"max_length": 1024, "gradient_checkpointing": True, "bf16": None},
    "grpo": {"max_completion_length": 512, "gradient_checkpointing": True, "bf16": None, "beta": 0.0},
    "rloo": {"max_completion_length": 512, "gradient_checkpointing": True, "bf16": None, "beta": 0.05},
    "ppo": {"max_prompt_length": 512, "max_new_tokens": 64, "gradient_checkpointing": None, "bf16": False},
}
DEFAULT_PROMPT_LENGTH = 512  # grpo/rloo prompts are not truncated by TRL 1.16; assumed unless given
STAGE_KEYS = (  # keys that only one stage's recipe has, to tell the stage when neither flag nor file name does
    ("ppo", ("num_ppo_epochs", "cliprange_value", "vf_coef", "value_model_path", "max_new_tokens")),
    ("grpo", ("num_generations", "max_completion_length", "steps_per_generation")),
    ("ips", ("is_clip_max", "is_clip_min", "datafilter", "logp_dir", "ref_tag")),
    ("dpo", ("ref_logps_dir", "rpo_alpha", "precompute_ref_log_probs", "ref_model_name_or_path")),
    ("rm", ("center_rewards_coefficient",)),
)
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
RESERVE_BYTES = 1 * GiB
FRAGMENTATION = 0.05


# ------------------------------------------------------------------------------------ model shape, counts


@dataclass
class Linear:
    name: str
    fan_in: int
    fan_out: int
    bias: bool
    part: str  # "attention" or "mlp"
    source: str  # which activation feeds it: attn_in, attn_out, mlp_in, mlp_mid (shared inputs, LoRA)

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass
class ModelShape:
    """What the estimate needs from config.json."""

    path: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    linears: list[Linear]  # of one decoder layer
    layer_norm_params: int  # per decoder layer (incl. Qwen3's q/k norms)
    final_norm_params: int
    layernorm: bool  # LayerNorm (activations) rather than RMSNorm
    gated_mlp: bool
    dtype: str | None  # the dtype config.json records
    counted_on_meta: bool = False
    meta_counts: dict[str, int] | None = None


@dataclass
class Counts:
    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    score_head: int
    per_layer: int
    linear_weights: int  # in·out summed over the decoder's linears (what 4/8-bit quantizes)
    linear_rows: int  # output rows of those linears (8-bit keeps an fp32 scale per row)

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head + self.score_head


def _config_dict(folder: Path, key: str) -> tuple[Path, dict]:
    """(model folder, config.json contents); a LoRA adapter folder leads to its local base model."""
    if not folder.is_dir():
        raise PipelineError(f"{key}: model folder not found: '{folder}' (a local folder with config.json)")
    if (folder / "config.json").is_file():
        return folder, read_json_object(folder / "config.json")
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = read_json_object(adapter).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            return _config_dict(Path(base), f"{key} (base of the adapter)")
        raise PipelineError(f"{key}: '{folder}' is a LoRA adapter whose base '{base}' is not a local folder")
    raise PipelineError(f"{key}: '{folder}' holds no config.json")


def _get(cfg: dict, *names: str, default=None):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def read_model_shape(path: str, key: str = "model_name_or_path") -> ModelShape:
    """Shape of a local decoder-only model from its config.json (model-class defaults filled in by
    transformers' AutoConfig where it knows the model type)."""
    folder, raw = _config_dict(Path(path), key)
    text_raw = raw["text_config"] if isinstance(raw.get("text_config"), dict) else {}
    if _get(raw, "hidden_size", "n_embd", "d_model") is None and _get(text_raw, "hidden_size") is None:
        raise PipelineError(f"{folder / 'config.json'}: no hidden_size (not a decoder-only model config)")
    cfg = dict(raw)
    model_type = str(cfg.get("model_type", "llama"))
    try:
        from transformers import AutoConfig

        resolved = AutoConfig.from_pretrained(str(folder))
        text = resolved.get_text_config() if hasattr(resolved, "get_text_config") else resolved
        cfg = {**text.to_dict(), **{k: v for k, v in raw.items() if k not in text.to_dict()}}
        cfg["tie_word_embeddings"] = getattr(resolved, "tie_word_embeddings", cfg.get("tie_word_embeddings"))
        model_type = text.model_type or model_type
    except Exception:  # unknown model_type or hand-written config: read the raw JSON with the usual defaults
        if isinstance(raw.get("text_config"), dict) and "hidden_size" not in raw:
            cfg = {**raw["text_config"], "tie_word_embeddings": raw.get("tie_word_embeddings")}
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head", "num_heads")
    vocab = _get(cfg, "vocab_size")
    for name, value in (("num_hidden_layers", layers), ("num_attention_heads", heads), ("vocab_size", vocab)):
        if value is None:
            raise PipelineError(f"{folder / 'config.json'}: no {name}")
    hidden, layers, heads, vocab = int(hidden), int(layers), int(heads), int(vocab)
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=hidden // heads))
    intermediate = int(_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    tied = cfg.get("tie_word_embeddings")
    tied = bool(tied) if tied is not None else model_type not in LLAMA_LIKE + ("gpt_neox",)
    q, kv = heads * head_dim, kv_heads * head_dim
    attention_bias = bool(cfg.get("attention_bias", False))
    norms, final, layernorm, gated = 2 * hidden, hidden, False, True
    if model_type == "gpt_neox":
        bias = bool(cfg.get("attention_bias", True))
        linears = [Linear("query_key_value", hidden, 3 * hidden, bias, "attention", "attn_in"),
                   Linear("dense", hidden, hidden, bias, "attention", "attn_out"),
                   Linear("dense_h_to_4h", hidden, intermediate, True, "mlp", "mlp_in"),
                   Linear("dense_4h_to_h", intermediate, hidden, True, "mlp", "mlp_mid")]  # fmt: skip
        norms, final, layernorm, gated = 4 * hidden, 2 * hidden, True, False
    elif model_type == "phi3":
        linears = [Linear("qkv_proj", hidden, q + 2 * kv, False, "attention", "attn_in"),
                   Linear("o_proj", q, hidden, False, "attention", "attn_out"),
                   Linear("gate_up_proj", hidden, 2 * intermediate, False, "mlp", "mlp_in"),
                   Linear("down_proj", intermediate, hidden, False, "mlp", "mlp_mid")]  # fmt: skip
    else:
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = attention_bias and model_type != "qwen2"
        mlp_bias = bool(cfg.get("mlp_bias", False))
        linears = [Linear("q_proj", hidden, q, qkv_bias, "attention", "attn_in"),
                   Linear("k_proj", hidden, kv, qkv_bias, "attention", "attn_in"),
                   Linear("v_proj", hidden, kv, qkv_bias, "attention", "attn_in"),
                   Linear("o_proj", q, hidden, o_bias, "attention", "attn_out"),
                   Linear("gate_proj", hidden, intermediate, mlp_bias, "mlp", "mlp_in"),
                   Linear("up_proj", hidden, intermediate, mlp_bias, "mlp", "mlp_in"),
                   Linear("down_proj", intermediate, hidden, mlp_bias, "mlp", "mlp_mid")]  # fmt: skip
        if model_type == "qwen3":
            norms += 2 * head_dim
    shape = ModelShape(
        path=str(folder), model_type=model_type, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, tied=tied, linears=linears,
        layer_norm_params=norms, final_norm_params=final, layernorm=layernorm, gated_mlp=gated,
        dtype=_get(raw, "dtype", "torch_dtype"),
    )  # fmt: skip
    if model_type not in LLAMA_LIKE + ("gpt_neox",):
        shape.meta_counts = _count_on_meta(folder)
        shape.counted_on_meta = shape.meta_counts is not None
    return shape


def _count_on_meta(folder: Path) -> dict[str, int] | None:
    """Exact counts of a model type the formulas do not cover: instantiate it on the meta device."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    except Exception:
        return None
    out = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0, "other": 0}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        low = name.lower()
        part = ("lm_head" if "lm_head" in low or "embed_out" in low else "embedding" if "embed" in low or "wte" in low
                else "norms" if "norm" in low or ".ln" in low else "attention" if "attn" in low or "attention" in low
                else "mlp" if "mlp" in low or "feed_forward" in low or "experts" in low else "other")  # fmt: skip
        out[part] += p.numel()
    return out


def count_params(shape: ModelShape, classifier: bool = False) -> Counts:
    """Exact parameter count of the causal LM (or of the sequence classifier with a 1-output score head)."""
    per_layer_attn = sum(li.params for li in shape.linears if li.part == "attention")
    per_layer_mlp = sum(li.params for li in shape.linears if li.part == "mlp")
    counts = Counts(
        embedding=shape.vocab * shape.hidden,
        attention=shape.layers * per_layer_attn,
        mlp=shape.layers * per_layer_mlp,
        norms=shape.layers * shape.layer_norm_params + shape.final_norm_params,
        lm_head=0 if shape.tied else shape.vocab * shape.hidden,
        score_head=0,
        per_layer=per_layer_attn + per_layer_mlp + shape.layer_norm_params,
        linear_weights=shape.layers * sum(li.fan_in * li.fan_out for li in shape.linears),
        linear_rows=shape.layers * sum(li.fan_out for li in shape.linears),
    )
    if shape.meta_counts is not None:
        m = shape.meta_counts
        counts = replace(counts, embedding=m["embedding"], attention=m["attention"] + m["other"], mlp=m["mlp"],
                         norms=m["norms"], lm_head=m["lm_head"])  # fmt: skip
        counts.per_layer = (counts.attention + counts.mlp + counts.norms) // max(shape.layers, 1)
    if classifier:
        counts = replace(counts, lm_head=0, score_head=shape.hidden)
    return counts


# ------------------------------------------------------------------------------------ LoRA


def lora_targets(shape: ModelShape, targets: Any) -> list[Linear]:
    """The decoder-layer linears LoRA wraps: "all-linear", a list / comma-separated names (matched as PEFT
    does, by the module name's last part), or None for PEFT's default for the model type."""
    if targets is None:
        default = None
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

            default = mapping.get(shape.model_type)
        except ImportError:
            pass
        targets = list(default) if default else ["q_proj", "v_proj"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if any(t == "all-linear" for t in targets):
        return list(shape.linears)
    wanted = {str(t).split(".")[-1] for t in targets}
    return [li for li in shape.linears if li.name in wanted]


def lora_params(shape: ModelShape, r: int, targets: list[Linear]) -> int:
    return shape.layers * sum(r * (li.fan_in + li.fan_out) for li in targets)


# ------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Everything the estimate depends on, resolved from recipe + flags + stage defaults."""

    stage: str
    num_gpus: int
    engine: str  # single | ddp | deepspeed | fsdp
    zero: int | None
    offload: bool
    micro_batch: int
    grad_accum: int
    seq_len: int  # tokens per training sequence
    prompt_len: int  # generation stages
    completion_len: int  # generation stages (logits only over these)
    gradient_checkpointing: bool
    mixed_precision: str  # bf16 | fp16 | no
    dtype: str  # loaded weights: float32 | bfloat16 | float16
    optim: str
    use_peft: bool
    lora_r: int
    lora_target_modules: Any
    lora_dropout: float
    load_in_4bit: bool
    load_in_8bit: bool
    nested_quant: bool
    reference: str  # what the reference model is: "none", "copy", "lora base", "stored logps"
    reward_model_path: str | None = None
    value_model_path: str | None = None
    reward_model: bool = False
    generation_batch: int = 0  # sequences generated at once (KV cache); 0: no generation in the stage
    policy_only: bool = False  # what the probe runs: no reference, critic, reward model or generation
    notes: list[str] = field(default_factory=list)

    @property
    def train_sequences(self) -> int:
        """Sequences in one micro-batch's forward (DPO and reward models: chosen and rejected)."""
        return self.micro_batch * (2 if self.stage in ("dpo", "rm") else 1)

    @property
    def logit_tokens(self) -> int:
        if self.stage == "rm":
            return 0
        if self.stage in ("grpo", "rloo"):
            return self.micro_batch * self.completion_len
        return self.train_sequences * self.seq_len

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.num_gpus

    def describe(self) -> str:
        gpus = f"{self.num_gpus} GPU{'s' if self.num_gpus > 1 else ''}"
        offload = " + CPU offload" if self.offload else ""
        what = {
            "deepspeed": f"DeepSpeed ZeRO-{self.zero}{offload} over {gpus}",
            "fsdp": f"FSDP2 (full shard){offload} over {gpus}",
            "ddp": f"DDP over {gpus}",
            "single": "one process on one GPU",
        }[self.engine]
        mp = {"bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision", "no": "no mixed precision"}
        return f"{what}, {mp[self.mixed_precision]}, weights loaded in {self.dtype}"


# ------------------------------------------------------------------------------------ the estimate


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


def estimate(shape: ModelShape, plan: Plan, critic: ModelShape | None = None,
             reward: ModelShape | None = None) -> Estimate:  # fmt: skip
    """Bytes per device for `plan` (see the module docstring for every formula)."""
    n = plan.num_gpus
    w = DTYPE_BYTES[plan.dtype]
    mp = plan.mixed_precision != "no"
    m = 2 if mp else w  # 16-bit copies under mixed precision
    e = 2 if (mp or w == 2) else 4
    z = plan.zero if plan.engine == "deepspeed" else None
    sharded_params = z == 3 or plan.engine == "fsdp"
    shard_w = n if sharded_params else 1
    shard_g = n if ((z is not None and z >= 2) or plan.engine == "fsdp") else 1
    shard_o = n if ((z is not None and z >= 1) or plan.engine == "fsdp") else 1
    notes: list[str] = []

    # the trained module: the policy (a sequence classifier for rm), plus the critic for ppo
    policy = count_params(shape, classifier=plan.stage == "rm")
    modules = [(shape, policy)]
    if plan.stage == "ppo" and not plan.policy_only:
        modules.append((critic or shape, count_params(critic or shape, classifier=True)))
    trained = frozen_bytes = 0.0
    models_total = 0
    lora_by_module = []
    for mod_shape, counts in modules:
        targets = lora_targets(mod_shape, plan.lora_target_modules) if plan.use_peft else []
        lora_by_module.append(targets)
        models_total += counts.total
        if plan.use_peft:
            adapters = lora_params(mod_shape, plan.lora_r, targets)
            models_total += adapters
            trained += adapters + counts.score_head  # the score head is trained in full (modules_to_save)
            frozen_bytes += _frozen_bytes(counts, plan, m, w)
        else:
            trained += counts.total

    # bytes per trained parameter: weights tw, gradients tg, optimizer to (fp32 master + AdamW m, v)
    moments = 2 if "8bit" in plan.optim else 8
    if plan.engine == "deepspeed":
        tw, tg, to = m, m, (4 if mp else 0) + moments
    elif plan.engine == "fsdp":
        tw, tg, to = 4, 4, moments
    else:
        tw = tg = 4 if plan.use_peft else w
        to = moments if tw == 4 else (2 if "8bit" in plan.optim else 2 * tw)
        if tw == 2 and mp:
            notes.append(
                "weights loaded in 16 bits train in pure 16-bit without DeepSpeed/FSDP (AdamW moments in 16 "
                "bits, no fp32 master copy); dtype: float32 gives mixed precision at 16 bytes per parameter"
            )
    items: list[Item] = []
    host: list[Item] = []

    def add(name: str, value: float, formula: str, on_host: bool = False) -> None:
        (host if on_host else items).append(Item(name, int(round(value)), formula))

    def per(shard: int) -> str:
        return f" / {shard}" if shard > 1 else ""

    n_trained = f"{trained / 1e6:,.2f}M trained"
    params_on_host = plan.offload and sharded_params
    grads_on_host = plan.offload and (plan.engine == "fsdp" or (z or 0) >= 2)
    if plan.use_peft:
        add("frozen base weights", frozen_bytes / shard_w, _frozen_formula(plan, m, w) + per(shard_w),
            on_host=params_on_host)  # fmt: skip
    add(
        "trained weights",
        trained * tw / shard_w,
        f"{tw} B × {n_trained}{per(shard_w)}",
        on_host=params_on_host,
    )
    add("gradients", trained * tg / shard_g, f"{tg} B × {n_trained}{per(shard_g)}", on_host=grads_on_host)
    master = "4 master + " if plan.engine == "deepspeed" and mp else ""
    add("optimizer states", trained * to / shard_o,
        f"({master}{to - (4 if master else 0)} AdamW m, v) B × {n_trained}{per(shard_o)}",
        on_host=plan.offload)  # fmt: skip
    if plan.offload and plan.engine == "deepspeed":
        add("fp32 gradient partitions", trained * 4 / n, f"4 B × {n_trained}{per(n)}", on_host=True)
    if plan.engine == "ddp":
        add("DDP gradient buckets", trained * tg, f"{tg} B × {n_trained}")
    elif plan.engine == "deepspeed":
        buckets = (2 + (0.9 if z == 3 else 0)) * shape.hidden**2 * m
        add("DeepSpeed buckets", buckets, f"{'2.9' if z == 3 else '2'} × H² × {m} B")
    elif plan.engine == "fsdp":
        add("FSDP reduce-scatter buffer", policy.per_layer * 4, "4 B × one decoder layer's parameters")
    if sharded_params:
        gathered = m * (policy.embedding + policy.lm_head + 2 * policy.per_layer)
        add("gathered 16-bit working set", gathered, f"{m} B × (embedding + lm_head + 2 decoder layers)")

    # frozen models beside the trained one (TRL shards them with ZeRO-3/FSDP; our ppo keeps them whole)
    side_shard = shard_w if plan.stage != "ppo" else 1
    if plan.reference == "copy" and not plan.policy_only:
        ref = count_params(shape)
        add("reference model", _frozen_bytes(ref, plan, m, w) / side_shard,
            f"frozen copy of {ref.total / 1e6:,.2f}M parameters{per(side_shard)}")  # fmt: skip
    if plan.reward_model and not plan.policy_only:
        rm = count_params(reward or shape, classifier=True)
        add(
            "reward model",
            rm.total * w / side_shard,
            f"{w} B × {rm.total / 1e6:,.2f}M parameters{per(side_shard)}",
        )
    persistent = sum(i.bytes for i in items)

    # one micro-batch: activations kept for backward, and the logits
    tokens = plan.train_sequences * plan.seq_len
    step = 0
    for index, ((mod_shape, _), targets) in enumerate(zip(modules, lora_by_module, strict=True)):
        lora = targets if plan.use_peft else None
        a = activation_bytes_per_token_layer(mod_shape, e, lora, plan.lora_r, plan.lora_dropout)
        outside = norm_bytes_per_token(mod_shape, e, frozen=plan.use_peft) + 8  # final norm, int64 token ids
        if plan.gradient_checkpointing:
            act = tokens * (mod_shape.layers * e * mod_shape.hidden + a + outside)
            formula = f"{tokens:,} tokens × (L·{e}·H + A + {outside:,}), A = {a:,} B"
        else:
            act = tokens * (mod_shape.layers * a + outside)
            formula = f"{tokens:,} tokens × (L·A + {outside:,}), A = {a:,} B"
        add("activations" if index == 0 else "critic activations", act, formula)
        step += int(act)
    logit_bytes = plan.logit_tokens * shape.vocab * (e + 8)
    if logit_bytes:
        add("logits", logit_bytes, f"{plan.logit_tokens:,} tokens × V × ({e} + 4 + 4) B")
    step += logit_bytes
    generation = 0
    if plan.generation_batch and not plan.policy_only:
        kv = shape.kv_heads * shape.head_dim
        length = plan.prompt_len + plan.completion_len
        generation = 2 * shape.layers * kv * e * plan.generation_batch * length
        add("generation KV cache", generation,
            f"2·L·{kv}·{e} B × {plan.generation_batch} sequences × {length} tokens (not during backward)")  # fmt: skip
    params = {
        "embedding": policy.embedding, "attention": policy.attention, "mlp": policy.mlp, "norms": policy.norms,
        "lm_head": policy.lm_head, "score_head": policy.score_head, "total": policy.total,
        "trained": int(trained), "models_total": int(models_total),
    }  # fmt: skip
    return Estimate(
        items=items, host_bytes=sum(i.bytes for i in host), host_items=host, persistent_bytes=persistent,
        step_bytes=step, generation_bytes=generation, params=params, notes=notes,
    )  # fmt: skip


def _frozen_formula(plan: Plan, m: int, w: int) -> str:
    if plan.load_in_4bit:
        nested = "0.5 + 1/64 + 4/16384" if plan.nested_quant else "0.5 + 4/64"
        return f"4-bit linears ({nested} B), the rest {w} B × base parameters"
    if plan.load_in_8bit:
        return f"8-bit linears (1 B + 4 B per row), the rest {w} B × base parameters"
    return f"{m if plan.engine == 'deepspeed' else w} B × base parameters"


# ------------------------------------------------------------------------------------ recipe → plan


def load_recipe(path: str) -> dict[str, Any]:
    from pipeline.configs import read_recipe_file

    return read_recipe_file(path)


def infer_stage(path: str, recipe: dict) -> tuple[str, str]:
    """(stage, how it was decided) from the file name or the recipe's stage-specific keys."""
    tokens = re.split(r"[^a-z]+", Path(path).stem.lower())
    for stage in STAGES:
        if stage in tokens:
            return stage, "from the file name"
    for stage, keys in STAGE_KEYS:
        found = [k for k in keys if k in recipe]
        if found:
            if stage == "grpo" and "rloo" in str(path).lower():
                stage = "rloo"
            return stage, f"from the recipe key '{found[0]}'"
    return "sft", "default: no stage-specific key"


def _as_bool(key: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise PipelineError(f"'{key}' must be true or false, got {value!r}")


def _as_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
        if number is None:
            raise ValueError
        return number
    except (TypeError, ValueError):
        raise PipelineError(f"'{key}' must be an integer, got {value!r}") from None


def _deepspeed_choice(value: Any, base: Path) -> tuple[int | None, bool]:
    """(ZeRO stage, offload) of a recipe's `deepspeed` entry (a JSON path or an inline mapping)."""
    if isinstance(value, str):
        path = Path(value) if Path(value).is_file() else base / value
        if not path.is_file():
            raise PipelineError(f"deepspeed: file not found: '{value}'")
        value = read_json_object(path)
    if not isinstance(value, dict):
        raise PipelineError("deepspeed: expected a JSON file path or a mapping")
    zero = value.get("zero_optimization", {}) or {}
    stage = _as_int("zero_optimization.stage", zero.get("stage", 0))
    offload = any(
        isinstance(zero.get(k), dict) and zero[k].get("device", "none") not in ("none", None)
        for k in ("offload_optimizer", "offload_param")
    )
    return stage, offload


def _accelerate_choice(path: str) -> dict[str, Any]:
    """Engine, ZeRO stage, offload and process count of an accelerate config YAML."""
    if not os.path.isfile(path):
        raise PipelineError(f"--accelerate_config: file not found: '{path}'")
    cfg = load_recipe(path)
    kind = str(cfg.get("distributed_type", "NO")).upper()
    out: dict[str, Any] = {"num_gpus": _as_int("num_processes", cfg.get("num_processes"))}
    if kind == "DEEPSPEED":
        ds = cfg.get("deepspeed_config", {}) or {}
        if ds.get("deepspeed_config_file"):
            out["zero"], out["offload"] = _deepspeed_choice(
                ds["deepspeed_config_file"], Path(path).parent.parent
            )
        else:
            out["zero"] = _as_int("zero_stage", ds.get("zero_stage", 2))
            out["offload"] = any(ds.get(k) not in (None, "none") for k in ("offload_optimizer_device",
                                                                            "offload_param_device"))  # fmt: skip
    elif kind == "FSDP":
        fsdp = cfg.get("fsdp_config", {}) or {}
        out["fsdp"], out["offload"] = (
            True,
            bool(_as_bool("fsdp_offload_params", fsdp.get("fsdp_offload_params"))),
        )
    return out


def visible_gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "total_bytes": int(props.total_memory)})
    return gpus


def build_plan(args: argparse.Namespace, recipe: dict, gpus: list[dict], config_dtype: str | None = None
               ) -> tuple[Plan, str]:  # fmt: skip
    stage, how = (args.stage, "from --stage") if args.stage else infer_stage(args.config, recipe)
    defaults = STAGE_DEFAULTS[stage]
    notes: list[str] = []

    def pick(key: str, flag: Any = None, default: Any = None) -> Any:
        if flag is not None:
            return flag
        if recipe.get(key) is not None:
            return recipe[key]
        return defaults.get(key, default)

    acc = _accelerate_choice(args.accelerate_config) if args.accelerate_config else {}
    zero, offload, fsdp = args.zero, args.offload, args.fsdp
    if zero is None and not fsdp:
        if "zero" in acc:
            zero, offload = acc["zero"], offload or acc["offload"]
        elif acc.get("fsdp"):
            fsdp, offload = True, offload or acc["offload"]
        elif recipe.get("deepspeed"):
            zero, ds_offload = _deepspeed_choice(recipe["deepspeed"], Path(args.config).parent)
            offload = offload or ds_offload
        elif recipe.get("fsdp"):
            fsdp = True
            offload = offload or "offload" in str(recipe["fsdp"])
    if zero is not None and fsdp:
        raise PipelineError("--zero and --fsdp exclude each other (DeepSpeed or FSDP, not both)")
    num_gpus = args.num_gpus or acc.get("num_gpus") or max(len(gpus), 1)
    if num_gpus < 1:
        raise PipelineError(f"--num_gpus must be at least 1, got {num_gpus}")
    engine = "fsdp" if fsdp else "deepspeed" if zero is not None else "ddp" if num_gpus > 1 else "single"
    if offload and engine not in ("fsdp", "deepspeed") or (offload and zero == 0):
        raise PipelineError("--offload needs --zero 1|2|3 or --fsdp (ZeRO-Offload / FSDP CPU offload)")
    if stage == "ppo" and (zero == 3 or fsdp):
        notes.append("pipeline ppo refuses ZeRO-3 and FSDP (generation needs whole weights): use --zero 2")

    bf16 = _as_bool("bf16", pick("bf16"))
    fp16 = _as_bool("fp16", pick("fp16", default=False))
    if fp16:
        mixed = "fp16"
    elif bf16 is None:  # the stages' parser turns bf16 on where the GPU has it
        if gpus:
            import torch

            mixed = "bf16" if torch.cuda.is_bf16_supported() else "no"
        else:
            mixed = "bf16"
            notes.append("bf16 unset: assumed on (what the stages do on a GPU with bf16)")
    else:
        mixed = "bf16" if bf16 else "no"
    dtype = str(pick("dtype", default="float32"))  # TRL's ModelConfig default
    if dtype == "auto":
        dtype = config_dtype if config_dtype in DTYPE_BYTES else "float32"
        notes.append(f"dtype auto: the model's config.json gives {dtype}")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise PipelineError(f"'dtype' must be float32, bfloat16, float16 or auto, got {dtype!r}")

    micro = _as_int(
        "per_device_train_batch_size",
        pick("per_device_train_batch_size", args.per_device_train_batch_size, 8),
    )
    accum = _as_int("gradient_accumulation_steps", pick("gradient_accumulation_steps", args.gradient_accumulation_steps, 1))  # fmt: skip
    if micro < 1 or accum < 1:
        raise PipelineError("per_device_train_batch_size and gradient_accumulation_steps must be at least 1")
    gc = _as_bool("gradient_checkpointing", pick("gradient_checkpointing", args.gradient_checkpointing))
    prompt_len = completion_len = 0
    generation_batch = 0
    if stage in ("grpo", "rloo"):
        completion_len = _as_int("max_completion_length", pick("max_completion_length", args.max_length))
        given = recipe.get("max_prompt_length") if args.prompt_length is None else args.prompt_length
        prompt_len = _as_int("max_prompt_length", given if given is not None else DEFAULT_PROMPT_LENGTH)
        if given is None:
            notes.append(f"prompt length not in the recipe: assumed {prompt_len} tokens (--prompt_length)")
        seq_len = prompt_len + completion_len
        if not _as_bool("use_vllm", recipe.get("use_vllm")):
            steps = _as_int("steps_per_generation", recipe.get("steps_per_generation")) or accum
            generation_batch = micro * steps
    elif stage == "ppo":
        prompt_len = _as_int("max_prompt_length", args.prompt_length or pick("max_prompt_length"))
        completion_len = _as_int("max_new_tokens", pick("max_new_tokens", args.max_length))
        seq_len = prompt_len + completion_len
        generation_batch = micro * accum * (_as_int("num_mini_batches", recipe.get("num_mini_batches")) or 1)
    else:
        seq_len = _as_int("max_length", pick("max_length", args.max_length))
    use_peft = bool(_as_bool("use_peft", recipe.get("use_peft")))
    load_4 = bool(_as_bool("load_in_4bit", recipe.get("load_in_4bit")))
    load_8 = bool(_as_bool("load_in_8bit", recipe.get("load_in_8bit")))
    if (load_4 or load_8) and not use_peft:
        notes.append("load_in_4bit/load_in_8bit train through LoRA (use_peft: true); without it this counts "
                     f"plain full training in {dtype}")  # fmt: skip

    reference = "none"
    if stage == "dpo":
        if recipe.get("ref_logps_dir") or _as_bool(
            "precompute_ref_log_probs", recipe.get("precompute_ref_log_probs")
        ):
            reference = "stored logps"
        elif use_peft and not recipe.get("ref_model_name_or_path"):
            reference = "lora base"
        else:
            reference = "copy"
    elif stage in ("grpo", "rloo", "ppo"):
        beta = float(pick("beta", default=0.0)) if stage != "ppo" else 1.0
        reference = "none" if beta == 0 else "lora base" if use_peft else "copy"
    elif stage == "ips":
        reference = "stored logps"
    funcs = recipe.get("reward_funcs", "")
    funcs = funcs if isinstance(funcs, list) else str(funcs).split(",")
    reward_model = stage in ("grpo", "rloo", "ppo") and "reward_model" in [str(f).strip() for f in funcs]

    lora_dropout = float(recipe.get("lora_dropout", 0.05) or 0.0)
    plan = Plan(
        stage=stage, num_gpus=num_gpus, engine=engine, zero=zero, offload=bool(offload), micro_batch=micro,
        grad_accum=accum, seq_len=seq_len, prompt_len=prompt_len, completion_len=completion_len,
        gradient_checkpointing=bool(gc), mixed_precision=mixed, dtype=dtype,
        optim=str(recipe.get("optim", "adamw_torch")), use_peft=use_peft,
        lora_r=_as_int("lora_r", recipe.get("lora_r", 16)), lora_target_modules=recipe.get("lora_target_modules"),
        lora_dropout=lora_dropout, load_in_4bit=load_4, load_in_8bit=load_8,
        nested_quant=bool(_as_bool("use_bnb_nested_quant", recipe.get("use_bnb_nested_quant"))),
        reference=reference, reward_model_path=recipe.get("reward_model_path"),
        value_model_path=recipe.get("value_model_path"), reward_model=reward_model,
        generation_batch=generation_batch, notes=notes,
    )  # fmt: skip
    return plan, how


# ------------------------------------------------------------------------------------ probe (GPU)


def run_probe(model_path: str, shape: ModelShape, plan: Plan, device: str = "cuda:0") -> dict[str, Any]:
    """One process on `device`, no sharding: two AdamW steps on random tokens at the plan's micro-batch and
    length; the peak memory (CUDA) and the second step's time. (The tests run it on "cpu", no peak.)"""
    import contextlib
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch_dtype = getattr(torch, plan.dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if plan.load_in_4bit or plan.load_in_8bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if plan.mixed_precision == "bf16" else torch_dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=plan.load_in_4bit, load_in_8bit=plan.load_in_8bit, bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=plan.nested_quant,
        )  # fmt: skip
        kwargs["device_map"] = {"": dev}
    classifier = plan.stage == "rm"
    seqs, length = plan.train_sequences, plan.seq_len
    result: dict[str, Any] = {"device": str(dev), "sequences": seqs, "length": length}
    model = optimizer = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    try:
        cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        extra = {"num_labels": 1} if classifier else {}
        model = cls.from_pretrained(model_path, **kwargs, **extra)
        if "device_map" not in kwargs:
            model.to(dev)
        if plan.use_peft:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=plan.lora_r, lora_alpha=2 * plan.lora_r, lora_dropout=plan.lora_dropout,
                target_modules=plan.lora_target_modules, task_type="SEQ_CLS" if classifier else "CAUSAL_LM",
            ))  # fmt: skip
        if plan.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if plan.use_peft:
                model.enable_input_require_grads()
        model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
        ids = torch.randint(0, shape.vocab, (seqs, length), device=dev)
        autocast = (
            torch.autocast(
                dev.type, dtype=torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float16
            )
            if plan.mixed_precision != "no" and plan.dtype == "float32"
            else contextlib.nullcontext()
        )
        times = []
        for _ in range(2):
            sync()
            start = time.perf_counter()
            with autocast:
                if classifier:
                    loss = model(input_ids=ids).logits.float().mean()
                elif plan.stage in ("grpo", "rloo"):  # logits of the completion only, as TRL computes them
                    keep = plan.completion_len
                    logits = model(input_ids=ids, logits_to_keep=keep + 1, use_cache=False).logits[:, :-1]
                    loss = torch.nn.functional.cross_entropy(
                        logits.float().flatten(0, 1), ids[:, -keep:].flatten()
                    )
                else:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
        result.update(
            peak_allocated_bytes=int(torch.cuda.max_memory_allocated(dev)) if cuda else None,
            peak_reserved_bytes=int(torch.cuda.max_memory_reserved(dev)) if cuda else None,
            step_seconds=times[-1], first_step_seconds=times[0], tokens_per_second=seqs * length / times[-1],
            loss=float(loss.detach()), out_of_memory=False,
        )  # fmt: skip
    except torch.OutOfMemoryError:
        result.update(out_of_memory=True, peak_allocated_bytes=int(torch.cuda.max_memory_allocated(dev)))
    finally:
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------ recommendation


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


# ------------------------------------------------------------------------------------ main


def _gib(value: float) -> str:
    return f"{value / GiB:,.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="pipeline check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a stage's YAML recipe")
    parser.add_argument("--stage", choices=STAGES, help="the recipe's stage (default: file name, then keys)")
    parser.add_argument("--model_name_or_path", help="override the recipe's model folder")
    parser.add_argument("--num_gpus", type=int, help="processes in total (default: GPUs visible, else 1)")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="ZeRO-Offload / FSDP CPU offload")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2, full shard")
    parser.add_argument(
        "--accelerate_config", help="read engine, ZeRO stage, offload, processes from this YAML"
    )
    parser.add_argument("--per_device_train_batch_size", type=int, help="override the recipe's micro-batch")
    parser.add_argument("--gradient_accumulation_steps", type=int, help="override the recipe's")
    parser.add_argument(
        "--max_length", type=int, help="override the length (completion length for grpo/rloo/ppo)"
    )
    parser.add_argument("--prompt_length", type=int, help="prompt tokens for grpo/rloo/ppo")
    parser.add_argument("--gradient_checkpointing", type=lambda s: _as_bool("--gradient_checkpointing", s))
    parser.add_argument(
        "--gpu_memory_gib", type=float, help="compare with a GPU of this size (e.g. on a CPU machine)"
    )
    parser.add_argument("--probe", type=lambda s: _as_bool("--probe", s), default=True,
                        help="on a GPU, run one probe step (default true)")  # fmt: skip
    parser.add_argument("--output_json", help="also write the result here")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.config)
    model_path = args.model_name_or_path or recipe.get("model_name_or_path")
    if not model_path:
        raise PipelineError(f"{args.config}: no model_name_or_path (a local model folder)")
    shape = read_model_shape(str(model_path))
    gpus = visible_gpus()
    plan, how = build_plan(args, recipe, gpus, shape.dtype)
    critic = reward = None
    if plan.stage == "ppo":
        source = plan.value_model_path or plan.reward_model_path
        critic = _optional_shape(source, "value_model_path", plan) if source else None
    if plan.reward_model and plan.reward_model_path:
        reward = _optional_shape(plan.reward_model_path, "reward_model_path", plan)
    est = estimate(shape, plan, critic, reward)
    plan.notes += est.notes

    gpu_rows = []
    targets = [dict(g) for g in gpus]
    if args.gpu_memory_gib:
        targets = [{"index": None, "name": f"--gpu_memory_gib {args.gpu_memory_gib:g}",
                    "total_bytes": int(args.gpu_memory_gib * GiB)}]  # fmt: skip
    for g in targets:
        budget = budget_bytes(g["total_bytes"])
        gpu_rows.append({**g, "budget_bytes": budget, "fits": est.total <= budget})
    probe = None
    offset = 0
    if gpus and args.probe:
        # the probe: one process, no sharding, the policy alone
        single = replace(
            plan, num_gpus=1, engine="single", zero=None, offload=False, policy_only=True, notes=[]
        )
        single_est = estimate(shape, single)
        if single_est.persistent_bytes > gpus[0]["total_bytes"]:
            probe = {"skipped": f"unsharded, the weights, gradients and optimizer alone take "
                                f"{_gib(single_est.persistent_bytes)} GiB, more than GPU 0 has"}  # fmt: skip
        else:
            probe = run_probe(shape.path, shape, plan, "cuda:0")
            probe["estimate_single_gpu_bytes"] = single_est.total
            if not probe["out_of_memory"]:
                offset = probe["peak_allocated_bytes"] - single_est.total
    recommendation = None
    options: list[str] = []
    if gpu_rows:
        budget = min(r["budget_bytes"] for r in gpu_rows)
        recommendation = recommend(shape, plan, budget, critic, reward, offset)
        if recommendation is None:
            options = alternatives(shape, plan, budget, critic, reward)

    result = {
        "recipe": args.config,
        "stage": plan.stage,
        "stage_from": how,
        "model": asdict(shape),
        "params": est.params,
        "plan": {k: v for k, v in asdict(plan).items() if k != "notes"},
        "global_batch": plan.global_batch,
        "memory_per_device": {i.name: i.bytes for i in est.items},
        "formulas": {i.name: i.formula for i in est.items},
        "persistent_bytes": est.persistent_bytes,
        "step_bytes": est.step_bytes,
        "generation_bytes": est.generation_bytes,
        "total_bytes": est.total,
        "host_memory_per_process": {i.name: i.bytes for i in est.host_items},
        "host_total_bytes": est.host_bytes,
        "gpus": gpu_rows,
        "gpu_visible": bool(gpus),
        "probe": probe,
        "recommendation": recommendation,
        "alternatives": options,
        "notes": plan.notes,
    }
    print(render(result, shape, plan, est))
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _optional_shape(path: str, key: str, plan: Plan) -> ModelShape | None:
    """Shape of a critic / reward model folder; the policy's shape (with a note) when it is not local."""
    try:
        return read_model_shape(path, key)
    except PipelineError as err:
        plan.notes.append(f"{err}: sized like the policy")
        return None


def render(result: dict, shape: ModelShape, plan: Plan, est: Estimate) -> str:
    p = est.params
    lines = [f"pipeline check: {result['recipe']} (stage {plan.stage}, {result['stage_from']})"]
    tied = "tied to the embedding" if shape.tied else f"{p['lm_head']:,}"
    how = " (counted on the meta device)" if shape.counted_on_meta else ""
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
    if not result["gpu_visible"]:
        lines.append("no GPU visible (torch.cuda.is_available() is False): estimate only, no probe step")
    for g in result["gpus"]:
        where = f"GPU {g['index']}" if g["index"] is not None else "planned GPU"
        verdict = "fits" if g["fits"] else "does NOT fit"
        lines.append(f"{where} {g['name']}: {_gib(g['total_bytes'])} GiB total, budget {_gib(g['budget_bytes'])} "
                     f"GiB: {verdict} (estimate {_gib(est.total)} GiB)")  # fmt: skip
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
                f"{_gib(probe['peak_allocated_bytes'])} GiB allocated, {_gib(probe['peak_reserved_bytes'])} GiB "
                f"reserved (estimate {_gib(probe['estimate_single_gpu_bytes'])} GiB); {probe['step_seconds']:.3f} "
                f"s/step, {probe['tokens_per_second']:,.0f} tokens/s"
            )
    rec = result["recommendation"]
    if rec:
        lines.append(
            f"recommended: per_device_train_batch_size {rec['per_device_train_batch_size']}, "
            f"gradient_accumulation_steps {rec['gradient_accumulation_steps']} (global batch {rec['global_batch']} "
            f"unchanged; {_gib(rec['estimate_bytes'])} GiB per GPU)"
        )
    elif result["gpus"]:
        lines.append("does not fit even at micro-batch 1" + (":" if result["alternatives"] else ""))
        lines += [f"  {a}" for a in result["alternatives"]]
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
