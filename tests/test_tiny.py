"""The offline tiny-model kit: tokenizer round-trip, chat template, determinism, Auto* loading."""

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pipeline.tiny import IM_END, PAD_TOKEN, make_tiny_model


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tokenizer_round_trip(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in [
        "def add_3(x):\n    return x + 3",
        "Write a function that reverses a string.",
        "  leading spaces, tabs\tand unicode: héllo ✓ 数字 🙂\n",
        "return retur return",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == IM_END
    assert tok.pad_token_id != tok.eos_token_id
    # BPE learned merges on the shipped corpus: code needs far fewer tokens than bytes
    code = "def add_3(x):\n    return x + 3"
    assert len(tok(code, add_special_tokens=False)["input_ids"]) <= 0.6 * len(code)


def test_chat_template_marks_exactly_the_assistant_turn(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = "def f(x):\n    return x"
    msgs = [{"role": "user", "content": "Write f(x) returning x."}, {"role": "assistant", "content": answer}]
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    marked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(marked) == answer + IM_END  # the answer and its stop token, nothing else
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_same_seed_identical_files_other_seed_other_weights(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    assert digests(a) == digests(b)
    da, dc = digests(a), digests(c)
    assert da["model.safetensors"] != dc["model.safetensors"]
    assert da["tokenizer.json"] == dc["tokenizer.json"]  # the tokenizer does not depend on the weight seed
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind


def test_auto_classes_load_offline_and_run(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    batch = tok(["def f(x):", "return x + 1"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm(**batch).logits
        scores = rm(**batch).logits
    assert logits.shape[-1] == len(tok) and scores.shape == (2, 1)
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()
    out = lm.generate(**tok(["def"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1


def test_llama_variant(tmp_path):
    path = make_tiny_model(tmp_path / "llama", seed=0, arch="llama")
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
