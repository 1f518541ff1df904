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

Parameter count: exact, from `pipeline.models.count_parameters` (the model built on the meta device: no
memory, no weights read). The per-linear structure LoRA and quantization need comes from these formulas,
which the tests check against the built models, and which stand alone where transformers cannot build the
config. H hidden size, L layers,
V vocabulary, I intermediate size, a query heads, k key/value heads, d head dim (head_dim or H/a):
    embedding   V·H
    attention   per layer H·a·d (q) + 2·H·k·d (k, v: grouped-query attention) + a·d·H (o)
                + biases (Qwen2: q, k, v; Llama/Qwen3/Gemma `attention_bias`: q, k, v, o; GPT-NeoX: all)
                + 2·d for Qwen3's q/k norms
    mlp         per layer 3·H·I (gate, up, down; GPT-NeoX: 2·H·I + biases I + H)
    norms       per layer 2·H (RMSNorm; LayerNorm with bias 4·H) + H for the final norm (2·H LayerNorm)
    lm_head     V·H, or 0 when tie_word_embeddings; a reward model / critic has a score head H instead
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

Code: shape (parameter counts), plan (recipe → plan), memory (the estimate), probe, render; `main` in stage.py.
"""

from pipeline.stages.check.memory import activation_bytes_per_token_layer, estimate, norm_bytes_per_token
from pipeline.stages.check.plan import STAGE_DEFAULTS, Plan, infer_stage
from pipeline.stages.check.probe import run_probe
from pipeline.stages.check.shape import count_params, lora_params, lora_targets, read_model_shape
from pipeline.stages.check.stage import main

__all__ = ["STAGE_DEFAULTS", "Plan", "activation_bytes_per_token_layer", "count_params", "estimate", "infer_stage",
           "lora_params", "lora_targets", "main", "norm_bytes_per_token", "read_model_shape", "run_probe"]  # fmt: skip
