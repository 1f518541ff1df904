"""`pipeline rm`: a reward model learns the synthetic task's preferences (checked again from the reloaded
folder), trains on prepare's pairs view and as LoRA, and refuses bad inputs in one line."""

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.configs import DataArguments
from pipeline.errors import PipelineError
from pipeline.models import check_reward_model_dir, load_reward_model
from pipeline.stages import prepare, rm

COMMON = ["--bf16", "false", "--gradient_checkpointing", "false", "--dtype", "float32", "--report_to", "none",
          "--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "16",
          "--max_length", "256", "--seed", "0", "--logging_steps", "10"]  # fmt: skip
RM_STEPS = 600


def run_rm(model, train, out, *flags, eval_data=None):
    argv = ["--model_name_or_path", str(model), "--train_data", str(train), "--output_dir", str(out), *COMMON]
    return rm.main(argv + (["--eval_data", str(eval_data)] if eval_data else []) + list(flags))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sft_demo_setup):
    """The InstructGPT recipe on the synthetic task: the reward model starts from the (demo) SFT model and
    trains on the 468 train problems' pairs plus one "other constant" pair each (`constant_negatives=1`),
    600 steps with Adam's beta2 at 0.95; evaluated on the 52 held-out problems' own 156 pairs (~1 min).

    Held-out accuracy over seeds 0-5 (measured): 0.981, 0.963, 0.963, 0.994, 0.969, 0.925. Each ingredient
    matters: with beta2 0.999, seed 0 stalls at 0.83 (training accuracy stuck near 0.75: the constant
    comparison is never learned); without the extra pairs, seed 1 gets 0.92 with beta2 0.95 and 0.85-0.88
    with 0.999 (400-800 steps)."""
    from pipeline.tasks.synthetic import preference_rows

    root = tmp_path_factory.mktemp("rm")
    train = root / "pairs_train.parquet"
    rows = preference_rows(sft_demo_setup["train_problems"], constant_negatives=1, seed=0)
    pq.write_table(pa.Table.from_pylist(rows), train)
    metrics = run_rm(sft_demo_setup["model"], train, root / "rm", "--max_steps", str(RM_STEPS),
                     "--learning_rate", "3e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                     "--adam_beta2", "0.95", eval_data=sft_demo_setup["data"]["pairs_eval"])  # fmt: skip
    return root / "rm", metrics


def pair_wins(folder, rows) -> list[bool]:
    """Per pair, whether the reloaded model scores the chosen side higher; batched with right padding, so the
    saved `pad_token_id` is what finds each sequence's last token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = [tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False)
             for side in ("chosen", "rejected") for r in rows]  # fmt: skip
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        scores = model(**batch).logits.squeeze(-1)
    return (scores[: len(rows)] > scores[len(rows) :]).tolist()


def other_constant(row) -> bool:
    """The rejected solution is the chosen one with another constant: `x + 38` for `x + 37`, `"i"` for `"h"`."""
    chosen, rejected = (
        re.sub(r'\d+|"[a-z]"', "C", row[side][0]["content"]) for side in ("chosen", "rejected")
    )
    return chosen == rejected


def test_reward_model_ranks_held_out_pairs(trained, sft_demo_setup):
    out, metrics = trained
    before, after = metrics["eval_accuracy_before"], metrics["eval_accuracy"]
    # the new random head ranks about half the held-out pairs right (0.62 here); after training >= 0.9 of
    # them (0.93-0.99 over six seeds, see `trained`)
    assert after >= 0.9 and after > before + 0.25, metrics
    assert metrics["eval_margin"] > metrics["eval_margin_before"] + 1.0, metrics
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["stage"] == "rm"
    for key in ("eval_accuracy_before", "eval_accuracy", "eval_margin_before", "eval_margin", "eval_loss"):
        assert info["metrics"][key] == pytest.approx(metrics[key])
    # saved as a one-output sequence classifier that pads with the tokenizer's pad token
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] is not None
    assert check_reward_model_dir(str(out)) == str(out)
    # independent check from the reloaded folder (batched, padded): the same accuracy as the trainer's eval
    rows = pq.read_table(sft_demo_setup["data"]["pairs_eval"]).to_pylist()
    wins = pair_wins(out, rows)
    assert sum(wins) / len(wins) == pytest.approx(after, abs=0.03)
    # both kinds of wrong solution are ranked: a wrong operation or function, and (a third of the pairs) a
    # constant off by one, which takes matching the code's number against the prompt's
    constant = [w for w, r in zip(wins, rows, strict=True) if other_constant(r)]
    structural = [w for w, r in zip(wins, rows, strict=True) if not other_constant(r)]
    assert len(constant) >= 40 and sum(constant) / len(constant) >= 0.75  # 0.77-0.98 over six seeds
    assert len(structural) >= 100 and sum(structural) / len(structural) >= 0.95  # 0.98-1.0


def test_check_reward_model_dir_refuses_non_reward_models(tmp_path, tiny_model_dir, trained):
    with pytest.raises(
        PipelineError, match=r"is a causal LM \(Qwen2ForCausalLM\), not a reward model; train"
    ):
        check_reward_model_dir(str(tiny_model_dir))
    with pytest.raises(PipelineError, match="reward_model_path: folder not found"):
        check_reward_model_dir(str(tmp_path / "nothing"))
    with pytest.raises(PipelineError, match="^ref_rm is required"):
        check_reward_model_dir(None, key="ref_rm")
    # a two-label classifier is not a scalar reward
    two = tmp_path / "two"
    shutil.copytree(trained[0], two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="classifier with 2 labels"):
        check_reward_model_dir(str(two))


def test_missing_preference_columns_fail_before_writing(tmp_path, tiny_model_dir, task_data):
    table = pq.read_table(task_data["pairs_train"])
    no_chosen = tmp_path / "no_chosen.parquet"
    pq.write_table(table.rename_columns(["prompt", "preferred", "rejected", "task_id"]), no_chosen)
    out = tmp_path / "out"
    with pytest.raises(
        PipelineError, match=rf"train_data: {no_chosen}: missing column 'chosen'.*'preferred'"
    ):
        run_rm(tiny_model_dir, no_chosen, out, "--max_steps", "1")
    # jsonl eval data without `rejected`, next to good train data
    no_rejected = tmp_path / "eval.jsonl"
    no_rejected.write_text(json.dumps({"prompt": "p", "chosen": "a", "worse": "b"}) + "\n")
    with pytest.raises(PipelineError, match=rf"eval_data: {no_rejected}: missing column 'rejected'"):
        run_rm(tiny_model_dir, task_data["pairs_train"], out, "--max_steps", "1", eval_data=no_rejected)
    assert not out.exists()


def coderl_rows(num_problems: int) -> list[dict]:
    """Logged code-RL rows (4 responses per prompt, 2 right and 2 wrong) with rewards known from the task,
    so prepare can form preference pairs without running the sandbox."""
    from pipeline.tasks.synthetic import generate_problems

    rows = []
    for p in generate_problems(num_problems, seed=1):
        responses = [
            (p.solution, 1.0),
            (p.wrong_solutions[0], -1.0),
            (p.solution, 1.0),
            (p.wrong_solutions[1], -0.5),
        ]
        prompt = json.dumps([{"role": "user", "content": p.prompt}])
        for j, (code, reward) in enumerate(responses):
            rows.append({"uid": f"{p.task_id}/r{j}", "prompt_pretokenized": prompt,
                         "unprocessed_response": f"```python\n{code}\n```", "normalized_reward": reward})  # fmt: skip
    return rows


def test_trains_on_prepare_pairs_view(tmp_path, tiny_model_dir):
    data = tmp_path / "logs.parquet"
    pq.write_table(pa.Table.from_pylist(coderl_rows(60)), data)
    prepared = tmp_path / "prepared"
    prepare.main(["--data_path", str(data), "--output_dir", str(prepared), "--eval_fraction", "0.2"])
    out = tmp_path / "rm"
    # the prepare output folder stands for its pairs view: train shards to train, eval shards to evaluate
    metrics = run_rm(tiny_model_dir, prepared, out, "--max_steps", "5", "--learning_rate", "1e-3")
    assert metrics["global_step"] == 5 and metrics["train_rows"] > 0 and metrics["eval_rows"] > 0
    assert metrics["train_rows"] + metrics["eval_rows"] == 120  # 2 pairs per prompt
    assert "eval_accuracy_before" in metrics and "eval_accuracy" in metrics
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["train_data"] == str(prepared / "pairs" / "train-*.parquet")
    assert config["eval_data"] == str(prepared / "pairs" / "eval-*.parquet")
    # the pairs folder itself stands for the view too; explicit eval_data is kept
    args = DataArguments(train_data=str(prepared / "pairs"), eval_data="mine.parquet")
    assert rm.use_pairs_view(args) == str(prepared / "pairs")
    assert (args.train_data, args.eval_data) == (str(prepared / "pairs" / "train-*.parquet"), "mine.parquet")


def test_lora_saves_a_seq_cls_adapter(tmp_path, tiny_model_dir, task_data):
    import torch
    from safetensors.torch import load_file

    # jsonl with implicit prompts: each side is the whole conversation
    data = tmp_path / "implicit.jsonl"
    rows = pq.read_table(task_data["pairs_train"]).to_pylist()[:200]
    data.write_text("".join(json.dumps({side: r["prompt"] + r[side] for side in ("chosen", "rejected")}) + "\n"
                            for r in rows))  # fmt: skip
    out = tmp_path / "lora"
    metrics = run_rm(tiny_model_dir, data, out, "--use_peft", "true", "--lora_r", "8",
                     "--lora_alpha", "16", "--lora_target_modules", "all-linear", "--max_steps", "5",
                     "--learning_rate", "1e-2")  # fmt: skip
    assert metrics["global_step"] == 5 and metrics["train_rows"] == 200
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)  # LoRA's B starts at zero: it was trained
    [head] = [
        w for name, w in weights.items() if name.endswith("score.weight")
    ]  # the new head is saved in full
    assert check_reward_model_dir(str(out)) == str(out)
    tokenizer, model = load_reward_model(str(out))
    assert torch.equal(model.get_submodule("base_model.model.score.modules_to_save.default").weight, head)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None


def test_accuracy_is_over_pooled_pairs_with_ties_as_half(tmp_path, tiny_model_dir, task_data):
    """10 eval pairs in batches of 4, 4, 2, the last two identical texts: accuracy is (#wins + ½ #ties) / 10
    over the pairs, as the saved model ranks them; TRL averaged the three batch means and counted a tie
    wrong (it would weigh the short tie-only batch as much as a full one, and score it 0)."""
    rows = pq.read_table(task_data["pairs_eval"]).to_pylist()[:8]
    rows += [{**r, "rejected": r["chosen"]} for r in rows[:2]]  # identical answers: a tie by any model
    eval_path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(rows), eval_path)
    metrics = run_rm(tiny_model_dir, task_data["pairs_train"], tmp_path / "rm", "--max_steps", "1",
                     "--per_device_eval_batch_size", "4", eval_data=eval_path)  # fmt: skip
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "rm"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    scores = {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            scores[side] = [model(**tokenizer(tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False),
                                              return_tensors="pt", add_special_tokens=False)).logits.item()
                            for r in rows]  # fmt: skip
    per_pair = [
        1.0 if c > r else 0.5 if c == r else 0.0
        for c, r in zip(scores["chosen"], scores["rejected"], strict=True)
    ]
    assert (
        per_pair[8:] == [0.5, 0.5]
        and len({c - r for c, r in zip(scores["chosen"][:8], scores["rejected"][:8], strict=True)}) == 8
    )
    assert metrics["eval_accuracy"] == pytest.approx(sum(per_pair) / 10, abs=1e-9)
    assert metrics["eval_ties"] == pytest.approx(0.2)
    margins = [c - r for c, r in zip(scores["chosen"], scores["rejected"], strict=True)]
    assert metrics["eval_margin"] == pytest.approx(sum(margins) / 10, abs=1e-4)
    batch_means = [sum(p >= 1 for p in per_pair[i : i + 4]) / len(per_pair[i : i + 4]) for i in (0, 4, 8)]
    assert sum(batch_means) / 3 != pytest.approx(metrics["eval_accuracy"])  # TRL's figure differs here
