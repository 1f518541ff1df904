"""A model's shape read from its config.json, and its exact parameter counts: the totals from
`pipeline.models.count_parameters` (the model built on the meta device), the per-linear structure that LoRA
and quantization need from formulas (used alone only where transformers cannot build the config)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.data import read_json_object
from pipeline.errors import PipelineError
from pipeline.models import count_parameters

GiB = 1024**3


DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


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
    # the exact count (meta device) for the totals; the formulas above give the per-linear structure
    shape.meta_counts = count_parameters(folder)
    shape.counted_on_meta = shape.meta_counts is not None
    return shape


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
        decoder = counts.attention + counts.mlp + counts.norms - shape.final_norm_params
        counts.per_layer = decoder // max(shape.layers, 1)
    if classifier:
        counts = replace(counts, lm_head=0, score_head=shape.hidden)
    return counts


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
