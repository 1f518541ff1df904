"""The probe: a few real steps on the GPU to measure what the model predicts (needs CUDA)."""

from __future__ import annotations

from typing import Any

from pipeline.stages.check.plan import Plan
from pipeline.stages.check.shape import ModelShape


def _load(model_path: str, plan: Plan, dev) -> Any:
    """The model as the stage trains it: dtype, 4/8-bit base, LoRA, gradient checkpointing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = cls.from_pretrained(model_path, **kwargs, **({"num_labels": 1} if classifier else {}))
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
    return model


def _loss(model, ids, plan: Plan):
    """The stage's kind of loss on random tokens (what matters is the memory its backward keeps)."""
    import torch

    if plan.stage == "rm":
        return model(input_ids=ids).logits.float().mean()
    if plan.stage in ("grpo", "rloo"):  # logits of the completion only, as TRL computes them
        keep = plan.completion_len
        logits = model(input_ids=ids, logits_to_keep=keep + 1, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, -keep:].flatten())
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def run_probe(model_path: str, shape: ModelShape, plan: Plan, device: str = "cuda:0") -> dict[str, Any]:
    """One process on `device`, no sharding: two AdamW steps on random tokens at the plan's micro-batch and
    length; the peak memory (CUDA) and the second step's time. (The tests run it on "cpu", no peak.)"""
    import contextlib
    import time

    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
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
        model = _load(model_path, plan, dev)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)
        ids = torch.randint(0, shape.vocab, (seqs, length), device=dev)
        half = torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float16
        autocast = (
            torch.autocast(dev.type, dtype=half)
            if plan.mixed_precision != "no" and plan.dtype == "float32"
            else contextlib.nullcontext()
        )
        times = []
        for _ in range(2):
            sync()
            start = time.perf_counter()
            with autocast:
                loss = _loss(model, ids, plan)
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
