"""`pipeline check` against hand-computed numbers, and the distributed config files it recommends.

Parameter counts are compared with the instantiated models (exact); the activation formula with the
tensors autograd actually saves; the memory items of a Llama-2-7B-shaped config with sums written out by
hand. Every DeepSpeed JSON is loaded by DeepSpeed's own config class after filling its "auto" values the way
the HF Trainer does; every accelerate YAML by accelerate's own loader; every `ds=` name of the scripts is
checked through accelerate's launcher.
"""

import copy
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.errors import PipelineError
from pipeline.stages import check
from pipeline.stages.check import (
    Plan,
    activation_bytes_per_token_layer,
    count_params,
    estimate,
    lora_params,
    lora_targets,
    norm_bytes_per_token,
    read_model_shape,
)

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
LLAMA2_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "float16",
}  # fmt: skip
P7B = 6_738_415_616


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """conftest's session model: `make_tiny_model(dir, seed=0)`, i.e. hidden_size=64, num_layers=2."""
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    return tiny_model_dir


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check") / "llama-2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    return folder


def recipe(tmp_path, name="sft.yaml", **values) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def plan(**overrides) -> Plan:
    values = dict(
        stage="sft", num_gpus=1, engine="single", zero=None, offload=False, micro_batch=4, grad_accum=2,
        seq_len=128, prompt_len=0, completion_len=0, gradient_checkpointing=False, mixed_precision="no",
        dtype="float32", optim="adamw_torch", use_peft=False, lora_r=16, lora_target_modules=None,
        lora_dropout=0.0, load_in_4bit=False, load_in_8bit=False, nested_quant=False, reference="none",
    )  # fmt: skip
    values.update(overrides)
    return Plan(**values)


# ------------------------------------------------------------------------------------ parameter counts


def test_tiny_model_parameters_by_hand_and_exact(tiny):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = read_model_shape(str(tiny))
    counts = count_params(shape)
    # qwen2, H 64, 2 layers, 4 heads / 2 kv heads (d 16), FFN 256, vocab 1024, tied embeddings
    attention = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64  # q, k, v with bias (Qwen2), o without
    assert counts.embedding == 1024 * 64
    assert counts.attention == 2 * attention == 24_832
    assert counts.mlp == 2 * 3 * 64 * 256
    assert counts.norms == 2 * 2 * 64 + 64
    assert counts.lm_head == 0
    assert counts.total == 188_992
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert counts.total == sum(p.numel() for p in model.parameters())
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    assert count_params(shape, classifier=True).total == sum(p.numel() for p in classifier.parameters())


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
        {"model_type": "llama", "num_key_value_heads": 1, "head_dim": 32},
        {"model_type": "mistral"},
        {"model_type": "qwen2", "tie_word_embeddings": False},
        {"model_type": "qwen3", "head_dim": 24},
        {"model_type": "gemma", "num_key_value_heads": 1, "head_dim": 16},
        {"model_type": "phi3", "pad_token_id": 0},
        {"model_type": "gpt_neox", "num_key_value_heads": None, "intermediate_size": 256},
        {"model_type": "olmo2"},  # not in the formulas: counted on the meta device
    ],
    ids=lambda c: c["model_type"],
)
def test_parameter_count_is_exact_for_each_family(tmp_path, config):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 96, "vocab_size": 300, "eos_token_id": 1, "bos_token_id": 0}  # fmt: skip
    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in {**base, **config}.items() if v is not None})
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert count_params(read_model_shape(str(tmp_path))).total == sum(p.numel() for p in model.parameters())


def test_llama2_7b_parameters(llama7b):
    shape = read_model_shape(str(llama7b))
    counts = count_params(shape)
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert counts.per_layer == per_layer
    assert counts.total == 2 * 32000 * 4096 + 32 * per_layer + 4096 == P7B
    # LoRA r=16 on PEFT's default llama targets (q_proj, v_proj): the well-known 8.4M
    targets = lora_targets(shape, None)
    assert [t.name for t in targets] == ["q_proj", "v_proj"]
    assert lora_params(shape, 16, targets) == 32 * 2 * 16 * (4096 + 4096) == 8_388_608
    assert len(lora_targets(shape, "all-linear")) == 7
    assert [t.name for t in lora_targets(shape, ["q_proj", "model.layers.0.mlp.down_proj"])] == [
        "q_proj",
        "down_proj",
    ]


# ------------------------------------------------------------------------------------ activations


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["full", "checkpointing", "lora"])
def test_activation_formula_matches_what_autograd_saves(tiny, dtype, mode):
    """Bytes of the distinct non-parameter tensors the forward saves for backward, against the formula."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    shape = read_model_shape(str(tiny))
    lora = None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        )
        lora = lora_targets(shape, "all-linear")
    if mode == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    b, s = 2, 256
    ids = torch.randint(0, shape.vocab, (b, s), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    e = 4 if dtype == "float32" else 2
    per_layer = (
        e * shape.hidden if mode == "checkpointing" else activation_bytes_per_token_layer(shape, e, lora, 8)
    )
    outside = norm_bytes_per_token(shape, e, frozen=lora is not None) + 8
    formula = b * s * (shape.layers * per_layer + outside)
    # full training: exact but for RoPE's cos/sin, shared by all layers. LoRA: the first layer's input has no
    # gradient (frozen embedding), so its first norm keeps nothing: 2-3% less with only two layers
    assert sum(saved.values()) == pytest.approx(formula, rel=0.03 if lora else 0.006)


def test_activation_formula_by_hand():
    class Shape:  # Llama-2-7B
        hidden, heads, kv_heads, head_dim, intermediate, layernorm, gated_mlp = (
            4096,
            32,
            32,
            128,
            11008,
            False,
            True,
        )

    # bf16: two RMSNorms 2·((4 + 4)·4096 + 4), q/k/v/out 2·(2·4096 + 2·4096), lse 4·32, SwiGLU 4·2·11008
    assert activation_bytes_per_token_layer(Shape, 2) == 2 * 32772 + 32768 + 128 + 88064 == 186_504


# ------------------------------------------------------------------------------------ memory estimates


def test_tiny_model_estimate_by_hand(tiny):
    shape = read_model_shape(str(tiny))
    est = estimate(shape, plan())  # fp32, one GPU, micro-batch 4 × 128 tokens, no checkpointing
    items = {i.name: i.bytes for i in est.items}
    p = 188_992
    a = 2 * ((4 + 8) * 64 + 4) + 4 * (2 * 64 + 2 * 32) + 4 * 4 + 4 * 4 * 256  # = 6,424 per token per layer
    assert a == 6424
    assert items == {
        "trained weights": 4 * p,
        "gradients": 4 * p,
        "optimizer states": 8 * p,
        "activations": 512 * (2 * a + (12 * 64 + 4) + 8),
        "logits": 512 * 1024 * (4 + 4 + 4),
    }
    assert est.total == 16 * p + 512 * (2 * 6424 + 780) + 512 * 1024 * 12 == 16_292_864


def test_llama2_7b_zero3_over_8_gpus_by_hand(llama7b):
    shape = read_model_shape(str(llama7b))
    p3 = plan(engine="deepspeed", zero=3, num_gpus=8, mixed_precision="bf16", dtype="bfloat16", micro_batch=1,
              grad_accum=16, seq_len=4096, gradient_checkpointing=True)  # fmt: skip
    est = estimate(shape, p3)
    items = {i.name: i.bytes for i in est.items}
    # ZeRO-3, bf16 mixed precision, AdamW: 2 (weights) + 2 (gradients) + 4 + 4 + 4 (fp32 master, m, v) per
    # parameter, everything divided by 8
    assert items["trained weights"] == 2 * P7B // 8 == 1_684_603_904
    assert items["gradients"] == 1_684_603_904
    assert items["optimizer states"] == 12 * P7B // 8 == 10_107_623_424
    assert 16 * P7B // 8 == 13_476_831_232
    assert items["gathered 16-bit working set"] == 2 * (2 * 131_072_000 + 2 * 202_383_360)
    assert items["DeepSpeed buckets"] == round(2.9 * 4096**2 * 2)
    # checkpointing: 4096 tokens × (32 layer inputs of 2·4096 B + one recomputed layer + final norm + id)
    assert items["activations"] == 4096 * (32 * 2 * 4096 + 186_504 + (8 * 4096 + 4) + 8)
    assert items["logits"] == 4096 * 32000 * (2 + 4 + 4)
    assert est.total == sum(items.values())
    # ZeRO-2: only the optimizer and the gradients are sharded; the whole bf16 model on each GPU
    z2 = {i.name: i.bytes for i in estimate(shape, Plan(**{**p3.__dict__, "zero": 2})).items}
    assert (z2["trained weights"], z2["gradients"], z2["optimizer states"]) == (
        2 * P7B,
        2 * P7B // 8,
        12 * P7B // 8,
    )
    # plain DDP with fp32 weights under bf16 autocast: 4 + 4 + 8 bytes, plus DDP's gradient buckets
    ddp = {
        i.name: i.bytes for i in estimate(shape, plan(engine="ddp", num_gpus=8, mixed_precision="bf16")).items
    }
    assert (ddp["trained weights"], ddp["gradients"], ddp["optimizer states"]) == (4 * P7B, 4 * P7B, 8 * P7B)
    assert ddp["DDP gradient buckets"] == 4 * P7B


def test_llama2_7b_qlora_and_offload_by_hand(llama7b):
    shape = read_model_shape(str(llama7b))
    qlora = plan(use_peft=True, lora_r=16, load_in_4bit=True, dtype="bfloat16", mixed_precision="bf16")
    items = {i.name: i.bytes for i in estimate(shape, qlora).items}
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # what bitsandbytes quantizes
    assert linear == 6_476_005_376
    assert items["frozen base weights"] == round(linear * (0.5 + 4 / 64) + (P7B - linear) * 2)
    assert items["trained weights"] == 4 * 8_388_608  # PEFT keeps the adapters in fp32
    assert items["optimizer states"] == 8 * 8_388_608
    offload = plan(
        engine="deepspeed", zero=3, offload=True, num_gpus=8, mixed_precision="bf16", dtype="bfloat16"
    )
    est = estimate(shape, offload)
    gpu = {i.name for i in est.items}
    assert not gpu & {"trained weights", "gradients", "optimizer states"}
    host = {i.name: i.bytes for i in est.host_items}
    assert host["optimizer states"] == 12 * P7B // 8 and host["trained weights"] == 2 * P7B // 8
    assert host["fp32 gradient partitions"] == 4 * P7B // 8


def test_reference_critic_and_generation_per_stage(tiny):
    shape = read_model_shape(str(tiny))
    p = count_params(shape).total
    dpo = {i.name: i.bytes for i in estimate(shape, plan(stage="dpo", reference="copy")).items}
    assert dpo["reference model"] == 4 * p
    assert dpo["logits"] == 2 * 4 * 128 * 1024 * 12  # chosen and rejected: twice the sequences
    ppo = plan(
        stage="ppo", reference="copy", seq_len=96, prompt_len=64, completion_len=32, generation_batch=16
    )
    items = {i.name: i.bytes for i in estimate(shape, ppo).items}
    critic = count_params(shape, classifier=True).total
    assert items["trained weights"] == 4 * (p + critic)  # policy and critic trained as one module
    assert items["critic activations"] == items["activations"] and "logits" in items  # same shape, no logits
    assert items["generation KV cache"] == 2 * 2 * (2 * 16) * 4 * 16 * 96
    grpo = plan(stage="grpo", micro_batch=4, seq_len=96, prompt_len=64, completion_len=32)
    assert {i.name: i.bytes for i in estimate(shape, grpo).items}["logits"] == 4 * 32 * 1024 * 12


# ------------------------------------------------------------------------------------ the stage


def test_cpu_run_prints_no_gpu_and_the_estimate(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = recipe(tmp_path, model_name_or_path=str(tiny), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_length=128, bf16=False, gradient_checkpointing=False, dtype="float32", learning_rate=1e-5)  # fmt: skip
    result = check.main(["--config", path, "--output_json", str(tmp_path / "out" / "check.json")])
    out = capsys.readouterr().out
    assert "no GPU visible" in out and "188,992 parameters" in out and "MiB" in out
    assert result["gpu_visible"] is False and result["probe"] is None and result["recommendation"] is None
    assert result["total_bytes"] == 16_292_864 and result["stage"] == "sft"
    assert json.loads((tmp_path / "out" / "check.json").read_text())["total_bytes"] == 16_292_864


def test_recommendation_keeps_the_global_batch(tmp_path, llama7b, capsys):
    path = recipe(tmp_path, model_name_or_path=str(llama7b), per_device_train_batch_size=4, gradient_accumulation_steps=8,
                  max_length=4096, bf16=True, dtype="bfloat16", gradient_checkpointing=True)  # fmt: skip
    result = check.main(
        ["--config", path, "--zero", "3", "--num_gpus", "8", "--gpu_memory_gib", "80", "--probe", "false"]
    )
    rec = result["recommendation"]
    assert rec["per_device_train_batch_size"] * rec["gradient_accumulation_steps"] == 32
    assert rec["global_batch"] == result["global_batch"] == 256
    budget = int(80 * GiB * 0.95 - GiB)
    assert rec["estimate_bytes"] <= budget
    shape = read_model_shape(str(llama7b))
    base = Plan(**{**result["plan"], "notes": []})
    larger = [d for d in (1, 2, 4, 8, 16, 32) if d > rec["per_device_train_batch_size"]]
    for micro in larger:  # the next larger divisor does not fit
        assert (
            estimate(shape, Plan(**{**base.__dict__, "micro_batch": micro, "grad_accum": 32 // micro})).total
            > budget
        )
    assert "recommended: per_device_train_batch_size" in capsys.readouterr().out
    # DDP of a full 7B in mixed precision (fp32 weights) does not fit an 80 GB GPU: alternatives are listed
    path = recipe(tmp_path, model_name_or_path=str(llama7b), per_device_train_batch_size=4, max_length=4096,
                  bf16=True, dtype="float32")  # fmt: skip
    result = check.main(["--config", path, "--num_gpus", "8", "--gpu_memory_gib", "80", "--probe", "false"])
    assert result["recommendation"] is None
    assert any(a.startswith("--zero 3") for a in result["alternatives"])
    assert "does not fit even at micro-batch 1" in capsys.readouterr().out


def test_stage_and_distributed_choice_from_recipe(tmp_path, tiny):
    assert check.infer_stage("recipes/qwen/dpo.yaml", {})[0] == "dpo"
    assert check.infer_stage("x.yaml", {"num_ppo_epochs": 2})[0] == "ppo"
    assert check.infer_stage("my_rloo_run.yaml", {})[0] == "rloo"
    assert check.infer_stage("x.yaml", {"num_generations": 8})[0] == "grpo"
    assert check.infer_stage("x.yaml", {"datafilter": "posonly"})[0] == "ips"
    assert check.infer_stage("x.yaml", {})[0] == "sft"
    path = recipe(tmp_path, "run.yaml", model_name_or_path=str(tiny), use_peft=True, lora_target_modules="all-linear",
                  deepspeed=str(REPO / "deepspeed_configs/zero3_offload.json"), beta=0.1, ref_logps_dir="x")  # fmt: skip
    result = check.main(["--config", path, "--num_gpus", "4", "--probe", "false"])
    assert result["stage"] == "dpo" and result["plan"]["reference"] == "stored logps"
    assert (result["plan"]["engine"], result["plan"]["zero"], result["plan"]["offload"]) == (
        "deepspeed",
        3,
        True,
    )
    acc = check.main(
        [
            "--config",
            path,
            "--accelerate_config",
            str(REPO / "accelerate_configs/fsdp2.yaml"),
            "--probe",
            "false",
        ]
    )
    assert (acc["plan"]["engine"], acc["plan"]["num_gpus"]) == ("fsdp", 8)
    ppo = recipe(tmp_path, "ppo.yaml", model_name_or_path=str(tiny), use_peft=True, reward_funcs="reward_model",
                 reward_model_path=str(tiny), max_new_tokens=32)  # fmt: skip
    result = check.main(["--config", ppo, "--zero", "3", "--num_gpus", "2", "--probe", "false"])
    assert result["plan"]["reference"] == "lora base" and "reward model" in result["memory_per_device"]
    assert any("refuses ZeRO-3" in n for n in result["notes"])


def test_stage_defaults_match_the_config_classes():
    import dataclasses

    from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

    for stage, cls in (("sft", SFTConfig), ("dpo", DPOConfig), ("rm", RewardConfig), ("grpo", GRPOConfig),
                       ("rloo", RLOOConfig)):  # fmt: skip
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in check.STAGE_DEFAULTS[stage].items():
            assert defaults[key] == value, (stage, key)
    from pipeline.stages.ips import IPSConfig
    from pipeline.stages.ppo import PPOStageConfig

    for stage, cls in (("ips", IPSConfig), ("ppo", PPOStageConfig)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, value in check.STAGE_DEFAULTS[stage].items():
            assert defaults[key] == value, (stage, key)


@pytest.mark.parametrize(
    "args, content, message",
    [
        (["--config", "{tmp}/missing.yaml"], None, "recipe file not found"),
        (["--config", "{tmp}/r.yaml"], {"model_name_or_path": "{tmp}/nowhere"}, "model folder not found"),
        (["--config", "{tmp}/r.yaml"], {"model_name_or_path": "{tmp}/bad"}, "no hidden_size"),
        (["--config", "{tmp}/r.yaml", "--zero", "2", "--fsdp"], {"model_name_or_path": "{tiny}"}, "exclude"),
        (["--config", "{tmp}/r.yaml", "--offload"], {"model_name_or_path": "{tiny}"}, "--offload needs"),
        (
            ["--config", "{tmp}/r.yaml"],
            {"model_name_or_path": "{tiny}", "per_device_train_batch_size": "x"},
            "integer",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny, args, content, message):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    if content is not None:
        text = yaml.safe_dump(content).replace("{tmp}", str(tmp_path)).replace("{tiny}", str(tiny))
        (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(PipelineError, match=message) as err:
        check.main([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--probe", "false"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"gradient_checkpointing": True},
        {"use_peft": True, "lora_r": 4, "lora_target_modules": "all-linear", "gradient_checkpointing": True},
        {"stage": "grpo", "seq_len": 48, "prompt_len": 32, "completion_len": 16},
        {"stage": "rm", "dtype": "bfloat16"},
    ],
    ids=["sft-checkpointing", "lora", "grpo", "rm"],
)
def test_probe_step_code_path_on_cpu(tiny, overrides):
    """The GPU probe's model loading, LoRA, checkpointing and loss paths, run on the CPU (no peak there)."""
    shape = read_model_shape(str(tiny))
    probe = check.run_probe(
        str(tiny), shape, plan(**{"micro_batch": 2, "seq_len": 32, **overrides}), device="cpu"
    )
    assert (
        probe["out_of_memory"] is False
        and probe["step_seconds"] > 0
        and probe["peak_allocated_bytes"] is None
    )
    assert (
        probe["sequences"] == (4 if overrides.get("stage") == "rm" else 2) and probe["loss"] == probe["loss"]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the probe step needs a CUDA GPU")
def test_probe_on_gpu(tmp_path, tiny):
    path = recipe(
        tmp_path, model_name_or_path=str(tiny), per_device_train_batch_size=4, max_length=128, bf16=True
    )
    result = check.main(["--config", path])
    probe = result["probe"]
    assert probe["out_of_memory"] is False and probe["peak_allocated_bytes"] > 0 and probe["step_seconds"] > 0
    assert result["recommendation"] is not None


# ------------------------------------------------------------------------------------ config files


def _fill_auto(config: dict, micro: int, accum: int, world: int) -> dict:
    """The "auto" values of a DeepSpeed JSON filled as the HF Trainer (via accelerate) fills them."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                             bf16=True, use_cpu=True, report_to="none", learning_rate=1e-5)  # fmt: skip

    class Model:
        class config:  # noqa: N801 - what the trainer reads: model.config.hidden_size
            hidden_size = 64

    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, Model, num_training_steps=100)
    filled = hf.config
    filled["train_batch_size"] = micro * accum * world
    assert "auto" not in json.dumps(filled), filled
    return filled


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "deepspeed_configs").glob("*.json")))
@pytest.mark.parametrize("world", [1, 8])
def test_deepspeed_json_loads_in_deepspeeds_config_class(name, world, monkeypatch):
    import deepspeed.runtime.config as ds_config
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((REPO / "deepspeed_configs" / name).read_text())
    filled = _fill_auto(raw, micro=2, accum=4, world=world)
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world)
    cfg = DeepSpeedConfig(filled)
    assert cfg.world_size == world and cfg.train_batch_size == 2 * 4 * world
    assert cfg.train_micro_batch_size_per_gpu == 2 and cfg.gradient_accumulation_steps == 4
    assert cfg.bfloat16_config.enabled and cfg.zero_optimization_stage == raw["zero_optimization"]["stage"]
    zero = cfg.zero_config
    if "offload" in name:
        assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"
        assert (
            cfg.optimizer_name == "adamw"
        )  # DeepSpeed's (CPU) Adam: a client optimizer is refused with offload
    else:
        assert zero.offload_optimizer is None and zero.offload_param is None


def test_every_accelerate_yaml_parses_and_names_an_existing_deepspeed_json():
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.stem for p in (REPO / "accelerate_configs").glob("*.yaml"))
    assert names == ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp2", "multi_gpu", "multi_node",
                     "single_gpu"]  # fmt: skip
    for name in names:
        path = REPO / "accelerate_configs" / f"{name}.yaml"
        text = path.read_text()
        assert "accelerate launch --config_file accelerate_configs/" in text, f"{name}: no launch line"
        config = load_config_from_file(str(path))  # accelerate's own loader (fails on unknown keys)
        assert yaml.safe_load(text)["distributed_type"] == str(config.distributed_type.value)
        ds = config.deepspeed_config or {}
        if str(config.distributed_type.value) == "DEEPSPEED":
            assert (REPO / ds["deepspeed_config_file"]).is_file(), name
            assert ds["zero3_init_flag"] == ("zero3" in ds["deepspeed_config_file"])
            assert ds["deepspeed_multinode_launcher"] == "standard"
    multi_node = (REPO / "accelerate_configs/multi_node.yaml").read_text()
    for flag in ("--machine_rank $NODE_RANK", "--main_process_ip $MASTER_ADDR", "--main_process_port $MASTER_PORT",
                 "--num_machines $WORKER_NUM"):  # fmt: skip
        assert flag in multi_node


def _dry_run(script: str, nodes: int = 1, **env) -> list[str]:
    env = {**os.environ, "dryrun": "1", "gpu": "8", "WORKER_NUM": str(nodes), "NODE_RANK": "1", "MASTER_ADDR": "node0",
           "MASTER_PORT": "1234", **env}  # fmt: skip
    args = ["d", "m", "t", "r", "k", "none"] if script == "train.sh" else ["d", "m", "t"]
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


EXPECTED = {  # ds= name -> (launcher kind, DeepSpeed JSON or None, ZeRO-3 init)
    "zero2": ("deepspeed", "zero2.json", "false"),
    "zero3": ("deepspeed", "zero3.json", "true"),
    "zero3_offload": ("deepspeed", "zero3_offload.json", "true"),
    "multi_node": ("deepspeed", "zero2.json", "false"),
    "fsdp2": ("fsdp", None, None),
    "ddp": ("multi_gpu", None, None),
    "single_gpu": ("single", None, None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("nodes", [1, 2])
def test_train_script_ds_names_pass_accelerates_launcher(name, nodes, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    if name == "single_gpu" and nodes == 2:
        env = {**os.environ, "dryrun": "1", "gpu": "8", "WORKER_NUM": "2", "ds": name}
        proc = subprocess.run(
            ["bash", str(REPO / "scripts/train.sh"), *"dmtrkn"], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 2 and "one process" in proc.stderr
        return
    argv = _dry_run("train.sh", nodes, ds=name)
    assert argv[1:3] == ["-m", "pipeline.launch"] and argv[
        argv.index("pipeline.cli") - 1 : argv.index("pipeline.cli") + 2
    ] == [
        "-m",
        "pipeline.cli",
        "ips",
    ]
    for value in (
        argv[i + 1] for i, a in enumerate(argv) if a in ("--config_file", "--deepspeed_config_file")
    ):
        assert Path(value).is_absolute() and Path(value).is_file()  # the scripts work from any directory
    args = launch_command_parser().parse_args(argv[3:])
    args, defaults, _ = _validate_launch_command(args)
    kind, json_name, zero3_init = EXPECTED[name]
    expected_processes = 1 if kind == "single" else 8 * nodes
    assert (args.num_processes, args.num_machines) == (expected_processes, 1 if kind == "single" else nodes)
    if nodes == 2:
        assert (args.machine_rank, args.main_process_ip, args.main_process_port) == (1, "node0", 1234)
    assert (args.use_deepspeed, args.use_fsdp, args.multi_gpu) == (
        kind == "deepspeed",
        kind == "fsdp",
        kind == "multi_gpu",
    )
    if kind == "deepspeed":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config) if defaults else ""
        if nodes == 2:
            assert args.deepspeed_multinode_launcher == "standard"  # torchrun-style, no pdsh/ssh
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(REPO / "deepspeed_configs" / json_name)
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == zero3_init
    elif kind == "fsdp":
        env = prepare_multi_gpu_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # what the training process builds from that environment
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


def test_scripts_ds_paths_and_errors(tmp_path):
    argv = _dry_run("train.sh", ds=str(REPO / "deepspeed_configs/zero3.json"))
    assert argv[3:6] == [
        "--use_deepspeed",
        "--deepspeed_config_file",
        str(REPO / "deepspeed_configs/zero3.json"),
    ]
    argv = _dry_run("train.sh", 2, ds=str(REPO / "deepspeed_configs/zero3.json"))
    assert argv[argv.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert _dry_run("train.sh", ds=str(REPO / "accelerate_configs/fsdp2.yaml"))[3:5] == [
        "--config_file", str(REPO / "accelerate_configs/fsdp2.yaml")]  # fmt: skip
    env = {**os.environ, "dryrun": "1", "gpu": "8", "ds": "zero4"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/train.sh"), *"dmtrkn"], capture_output=True, text=True, env=env
    )
    assert (
        proc.returncode == 2 and "ds=zero4: unknown setup" in proc.stderr and "zero3_offload" in proc.stderr
    )
    # logp is data-parallel: a sharding name is noted and launched as DDP
    env = {**os.environ, "dryrun": "1", "gpu": "8", "ds": "zero3"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/run_logp.sh"), "d", "m", "t"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and "shards nothing" in proc.stderr and "--multi_gpu" in proc.stdout.split()
    # no GPU: one CPU process, no DeepSpeed, whatever ds says
    assert _dry_run("train.sh", gpu="0", ds="zero3")[3:6] == ["--cpu", "--num_processes", "1"]


def test_scripts_check_the_gpus_they_are_asked_for(tmp_path):
    """gpu=N against the GPUs this node has (a stand-in nvidia-smi lists 2): more than visible is one line and
    status 2; WORKER_NUM > 1 on a node without GPUs too; a gpu= that is not a number too."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\n"
    )
    (fake / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("WORKER_NUM", "dryrun")}
    cases = [
        (
            {"PATH": f"{fake}:{os.environ['PATH']}", "gpu": "8"},
            "gpu=8 asked, but this node has 2 GPU(s) visible",
        ),
        (
            {"gpu": "8", "WORKER_NUM": "2", "NODE_RANK": "0", "MASTER_ADDR": "n0"},
            "no GPU is visible on this node",
        ),
        ({"gpu": "eight"}, "gpu='eight' must be a whole number"),
    ]
    for env, message in cases:
        for script, args in (("train.sh", [*"dmtrkn"]), ("run_logp.sh", ["d", "m", "t"])):
            proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                                  env={**base, **env}, timeout=60)  # fmt: skip
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (
                script,
                env,
                proc.stderr,
            )
