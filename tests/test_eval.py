"""`pipeline eval`: generation with an answer cache, sandboxed pass@k, reward-model scores and pairwise
judging (reward model, or an OpenAI-compatible endpoint played by a local HTTP server), in-process.

Generation is the tiny random model's own (greedy or sampled) where the test is about generation or the
cache; where a test needs answers with known properties (k correct of n, one model better than another),
`generate_answers` is replaced by a stub and the rest of the stage runs as is.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import threading
import time
import types
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.judges import OpenAIJudge, PairwiseJudge, judge_both_orders, verdict_of
from pipeline.stages import eval as ev
from pipeline.tasks.synthetic import generate_problems, split_problems

NUM_PROBLEMS = 40  # the synthetic task exported with --num_problems 40 holds out 4 problems
HELD_OUT = split_problems(generate_problems(NUM_PROBLEMS, 0), 0.1, 0)[1]
FAST = ["--max_new_tokens", "12", "--bootstrap_samples", "200"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are too small to gain from a second thread, and with the other core busy
    (tests of another session) OpenMP's spin-waiting made each one ~500x slower here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """A second tiny model: same tokenizer, other random weights (so another fingerprint)."""
    from transformers import AutoTokenizer

    from pipeline.tiny import build_model

    path = tmp_path_factory.mktemp("other") / "other"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A scalar reward model (random head on the tiny model): enough to exercise the reward-model paths."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("rm") / "rm"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """The generic prompt-file form: chat `prompt`, `tests`, `task_id` (3 held-out problems)."""
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "tests": p.tests, "task_id": p.task_id}
            for p in HELD_OUT[:3]]  # fmt: skip
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def stub_generation(monkeypatch, answer_for):
    """Replace generation by `answer_for(model_dir_name, rendered_prompt, sample_index) -> str`; returns the
    list of calls made."""
    calls = []

    def fake(tokenizer, model, texts, *, num_samples=1, progress=None, **kwargs):
        calls.append(len(texts))
        name = Path(model.name_or_path).name
        return [[answer_for(name, text, s) for s in range(num_samples)] for text in texts]

    monkeypatch.setattr(ev.generation, "generate_answers", fake)  # where answers_for calls it
    return calls


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------ pass@k


def test_pass_at_k_equals_the_unbiased_estimator_on_known_counts(tmp_path, tiny_model_dir, monkeypatch):
    n, correct = 5, [0, 1, 3, 5]  # correct answers among n for each of the 4 held-out problems
    problem_of = {p.prompt: (i, p) for i, p in enumerate(HELD_OUT)}

    def answer(_, text, s):
        i, p = next(v for k, v in problem_of.items() if k in text)
        return f"```python\n{p.solution}\n```" if s < correct[i] else p.wrong_solutions[0]

    stub_generation(monkeypatch, answer)
    logged: dict = {"log": []}

    class FakeRun:
        summary: dict = {}

        def log(self, data):
            logged["log"].append(data)

        def finish(self):
            logged["finished"] = True

    def init(**kwargs):
        logged["init"] = kwargs
        return FakeRun()

    fake_wandb = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    out = tmp_path / "out"
    metrics = ev.main(["--models", str(tiny_model_dir), "--model_names", "tiny", "--synthetic_num_problems",
                       str(NUM_PROBLEMS), "--num_samples", str(n), "--temperature", "0.8", "--pass_k", "1", "2",
                       "5", "--output_dir", str(out), "--report_to", "wandb", *FAST])  # fmt: skip

    def unbiased(c, k):  # 1 - C(n-c, k) / C(n, k), exactly
        return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))

    report = read_json(out / "eval.json")
    rows = {r["prompt_id"]: r for r in report["per_prompt"]}
    assert [rows[p.task_id]["num_passed"] for p in HELD_OUT] == correct
    for k in (1, 2, 5):
        expected = [unbiased(c, k) for c in correct]
        got = [rows[p.task_id][f"pass@{k}"] for p in HELD_OUT]
        assert got == pytest.approx(expected, abs=1e-12), k
        agg = report["aggregates"]["tiny"][f"pass@{k}"]
        assert agg["mean"] == pytest.approx(sum(expected) / 4) == metrics[f"tiny/pass@{k}"]
        assert agg["n"] == 4 and agg["ci_low"] <= agg["mean"] <= agg["ci_high"]
    # the CSV holds the same per-prompt numbers; run.json and the tracker get the aggregates
    with open(out / "eval.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["pass@2"]) for r in table] == pytest.approx(
        [rows[r["prompt_id"]]["pass@2"] for r in table]
    )
    info = read_json(out / "run.json")
    assert info["stage"] == "eval" and info["status"] == "completed"
    assert info["metrics"]["tiny/pass@1"] == metrics["tiny/pass@1"] == pytest.approx(9 / 20)
    assert logged["log"][0]["eval/tiny/pass@5"] == pytest.approx(0.75) and logged["finished"]
    assert logged["init"]["config"]["num_samples"] == n
    samples = pq.read_table(out / "eval_samples.parquet").to_pylist()
    assert len(samples) == 4 * n and sum(s["passed"] for s in samples) == sum(correct)
    assert not list(out.glob(".*tmp*"))  # every file renamed into place


def test_humaneval_rows_run_their_check():
    item = ev.PromptItem("toy/0", [{"role": "user", "content": "Complete f."}], "k0")
    item.humaneval = {"test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "f",
                      "code_prompt": 'def f(x):\n    """Add one."""\n'}  # fmt: skip
    right, wrong = "```python\ndef f(x):\n    return x + 1\n```", "def f(x):\n    return x"
    cfg = ev.EvalConfig(num_samples=2, code_timeout=5.0)
    assert ev.score_code([item], {"m": {"k0": [right, wrong]}}, cfg) == {"m": {"k0": [True, False]}}
    assert ev.pass_at_k_of([True, False], [1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}


# ------------------------------------------------------------------------------------------ cache


def test_cached_answers_are_reused_and_sampling_is_seeded(
    tmp_path, tiny_model_dir, reward_model_dir, monkeypatch
):
    real = ev.generate_answers
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev.generation, "generate_answers", counting)
    cache = tmp_path / "cache"
    base = ["--synthetic_num_problems", str(NUM_PROBLEMS), "--max_prompts", "2", "--answers_cache", str(cache),
            "--temperature", "1.0", "--num_samples", "2", "--pass_k", "1", "2", *FAST]  # fmt: skip
    first = ev.main(["--models", str(tiny_model_dir), "--output_dir", str(tmp_path / "a"), *base])
    assert calls == [2] and first["model/generated_prompts"] == 2  # named after the folder
    answers = pq.read_table(tmp_path / "a" / "eval_samples.parquet").column("answer").to_pylist()

    # re-scoring with another scorer (and the same model listed twice): every answer comes from the cache
    second = ev.main(["--models", str(tiny_model_dir), str(tiny_model_dir), "--model_names", "x", "y",
                      "--scorers", "reward_model", "--reward_model_path", reward_model_dir,
                      "--output_dir", str(tmp_path / "b"), *base])  # fmt: skip
    assert calls == [2] and second["x/generated_prompts"] == second["y/generated_prompts"] == 0
    again = pq.read_table(tmp_path / "b" / "eval_samples.parquet").to_pylist()
    assert [s["answer"] for s in again if s["model"] == "x"] == answers
    assert second["x/reward"] == second["y/reward"] and second["x/reward"] is not None

    # sampling is seeded: a fresh cache gives the same answers; other sampling settings are another key
    ev.main(["--models", str(tiny_model_dir), "--output_dir", str(tmp_path / "c"), *base,
             "--answers_cache", str(tmp_path / "fresh")])  # fmt: skip
    assert pq.read_table(tmp_path / "c" / "eval_samples.parquet").column("answer").to_pylist() == answers
    ev.main(["--models", str(tiny_model_dir), "--output_dir", str(tmp_path / "d"), *base, "--seed", "1"])
    assert calls == [2, 2, 2] and len(list(cache.glob("answers-*.parquet"))) == 2


def test_lora_adapter_is_evaluated_with_its_base(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    metrics = ev.main(["--models", str(adapter), "--synthetic_num_problems", str(NUM_PROBLEMS), "--max_prompts",
                       "2", "--output_dir", str(tmp_path / "out"), *FAST])  # fmt: skip
    assert metrics["adapter/generated_prompts"] == 2 and metrics["adapter/pass@1"] == 0.0  # a random model
    report = read_json(tmp_path / "out" / "eval.json")
    assert report["models"]["adapter"]["fingerprint"] != ev.model_fingerprint(str(tiny_model_dir))


# ------------------------------------------------------------------------------------------ pairwise


def test_a_model_judged_against_itself_wins_half(tmp_path, tiny_model_dir, reward_model_dir):
    metrics = ev.main(["--models", str(tiny_model_dir), str(tiny_model_dir), "--model_names", "base", "same",
                       "--synthetic_num_problems", str(NUM_PROBLEMS), "--scorers", "pairwise_judge", "reward_model",
                       "--judge", "reward_model", "--reward_model_path", reward_model_dir,
                       "--judge_skip_identical", "false", "--output_dir", str(tmp_path / "out"), *FAST])  # fmt: skip
    assert metrics["same/win_rate"] == 0.5
    assert metrics["same/win_rate_ci_low"] == metrics["same/win_rate_ci_high"] == 0.5
    assert metrics["judge_invalid"] == 0 and metrics["judge_pairs"] == 4
    assert metrics["same/generated_prompts"] == 0  # the same model's answers came from the cache
    agg = read_json(tmp_path / "out" / "eval.json")["aggregates"]["same"]["win_rate"]
    assert agg["baseline"] == "base" and agg["ties"] == 4


class AlwaysFirst(PairwiseJudge):
    def judge(self, prompts, first, second):
        return [1.0] * len(prompts)


class PrefersLonger(PairwiseJudge):
    def judge(self, prompts, first, second):
        return [1.0 if len(a) > len(b) else 0.0 for a, b in zip(first, second, strict=True)]


def test_both_orders_cancel_a_judge_that_prefers_the_first_answer():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    short, long = ["a"] * 4, ["a much longer answer"] * 4
    biased = judge_both_orders(AlwaysFirst(), prompts, short, long)
    assert [r.score for r in biased] == [0.5] * 4 and [r.first_position for r in biased] == [1.0] * 4
    # a judge without position bias keeps its verdict whichever order the answers come in
    assert [r.score for r in judge_both_orders(PrefersLonger(), prompts, long, short)] == [1.0] * 4
    assert [r.score for r in judge_both_orders(PrefersLonger(), prompts, short, long)] == [0.0] * 4


def test_verdicts_are_read_strictly():
    assert [verdict_of(t) for t in ("A", " [[B]]", "Response A.", "B is better", "b")] == [
        1.0,
        0.0,
        1.0,
        0.0,
        None,
    ]
    assert [verdict_of(t) for t in ("a tie", "Both", "", None, "ABBA")] == [None] * 5


# ------------------------------------------------------------------------------------------ OpenAI-compatible


def chat_completion(content) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "model": "judge",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()  # fmt: skip


def answers_in(request: dict) -> tuple[str, str]:
    text = request["messages"][0]["content"]
    a = text.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
    b = text.split("[Response B]\n", 1)[1].split("\n\nReply with", 1)[0]
    return a, b


@pytest.fixture
def judge_server():
    """`start(respond)` serves POST /v1/chat/completions on 127.0.0.1 with `respond(request, headers, n) ->
    (status, body)` (n counts requests) and returns (base_url, seen requests)."""
    servers, release = [], threading.Event()

    def start(respond):
        seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append((self.path, request, dict(self.headers)))
                status, body = respond(request, self.headers, len(seen))
                if status is None:  # a server that never answers
                    release.wait(30)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", seen

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def run_with_judge(tmp_path, tiny_model_dir, other_model_dir, base_url, *flags):
    """baseline `base` (the other model) answers 'pass', `cand` (the tiny model) answers with a return."""
    return ev.main(["--models", other_model_dir, str(tiny_model_dir), "--model_names", "base", "cand",
                    "--synthetic_num_problems", str(NUM_PROBLEMS), "--scorers", "pairwise_judge", "--judge",
                    "openai", "--judge_base_url", base_url, "--judge_model", "judge-1", "--judge_timeout", "5",
                    "--judge_backoff", "0.01", "--judge_api_key_env", "EVAL_TEST_JUDGE_KEY",
                    "--output_dir", str(tmp_path / "out"), *FAST, *flags])  # fmt: skip


ANSWERS = {"other": "pass", "model": "def f(x):\n    return x"}


def test_openai_judge_against_a_local_server(
    tmp_path, tiny_model_dir, other_model_dir, judge_server, monkeypatch
):
    stub_generation(monkeypatch, lambda name, text, s: ANSWERS[name])
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", "s3cret-key-value")

    def prefers_return(request, headers, n):
        a, b = answers_in(request)
        return 200, chat_completion("A" if "return" in a else "B")

    url, seen = judge_server(prefers_return)
    metrics = run_with_judge(tmp_path, tiny_model_dir, other_model_dir, url)
    assert metrics["cand/win_rate"] == 1.0 and metrics["judge_invalid"] == 0
    assert (
        metrics["judge_first_position_rate"] == 0.5 and metrics["judge_requests"] == 8
    )  # 4 prompts x 2 orders
    path, request, headers = seen[0]
    assert path == "/v1/chat/completions" and request["model"] == "judge-1" and request["temperature"] == 0
    assert headers["Authorization"] == "Bearer s3cret-key-value"
    out = tmp_path / "out"
    for name in ("run.json", "run.log", "eval.json", "eval.csv"):
        assert "s3cret" not in (out / name).read_text(), name
    assert read_json(out / "run.json")["config"]["judge_api_key_env"] == "EVAL_TEST_JUDGE_KEY"
    samples = pq.read_table(out / "eval_samples.parquet").to_pylist()  # the baseline's rows come first
    assert [s["win"] for s in samples] == [None] * 4 + [1.0] * 4

    # a judge that always answers "A" (pure position bias) scores the better model 0.5, not 1.0
    url, _ = judge_server(lambda request, headers, n: (200, chat_completion("A")))
    shutil.rmtree(out)
    metrics = run_with_judge(tmp_path, tiny_model_dir, other_model_dir, url)
    assert metrics["cand/win_rate"] == 0.5 and metrics["judge_first_position_rate"] == 1.0


def test_judge_replies_without_a_verdict_are_counted_invalid(
    tmp_path, tiny_model_dir, other_model_dir, judge_server, monkeypatch
):
    stub_generation(monkeypatch, lambda name, text, s: ANSWERS[name])
    url, _ = judge_server(lambda request, headers, n: (200, chat_completion("I cannot decide.")))
    metrics = run_with_judge(tmp_path, tiny_model_dir, other_model_dir, url)
    assert metrics["judge_invalid"] == metrics["judge_pairs"] == 4 and metrics["cand/win_rate"] is None
    rows = read_json(tmp_path / "out" / "eval.json")["per_prompt"]
    assert [r["judge_invalid"] for r in rows if r["model"] == "cand"] == [1, 1, 1, 1]


def test_a_garbage_server_is_a_one_line_error(
    tmp_path, tiny_model_dir, other_model_dir, judge_server, monkeypatch
):
    stub_generation(monkeypatch, lambda name, text, s: ANSWERS[name])
    url, seen = judge_server(lambda request, headers, n: (200, b"<html>\x00\xffnot json at all"))
    with pytest.raises(PipelineError, match="not an OpenAI chat completion") as err:
        run_with_judge(tmp_path, tiny_model_dir, other_model_dir, url, "--judge_concurrency", "1")
    assert "\n" not in str(err.value) and url in str(err.value)
    assert len(seen) == 1  # not retried: the endpoint is wrong, not busy
    assert read_json(tmp_path / "out" / "run.json")["status"] == "failed"


def test_a_rerun_after_a_judge_failure_asks_only_what_is_missing(
    tmp_path, tiny_model_dir, other_model_dir, judge_server, monkeypatch
):
    stub_generation(monkeypatch, lambda name, text, s: ANSWERS[name])
    down = [False]

    def flaky(request, headers, n):  # the 6th request finds the key revoked (401: not retried)
        down[0] = down[0] or n == 6
        return (
            (401, b"{}")
            if down[0]
            else (200, chat_completion("A" if "return" in answers_in(request)[0] else "B"))
        )

    url, seen = judge_server(flaky)
    with pytest.raises(PipelineError, match="HTTP 401"):
        run_with_judge(tmp_path, tiny_model_dir, other_model_dir, url, "--judge_concurrency", "1")
    paid = [json.dumps(request) for _, request, _ in seen[:5]]
    down[0], seen[:] = False, []
    metrics = run_with_judge(tmp_path, tiny_model_dir, other_model_dir, url, "--judge_concurrency", "1")
    assert metrics["judge_cached"] == 5 and metrics["judge_requests"] == 3  # 4 prompts x 2 orders, 5 kept
    assert not {json.dumps(request) for _, request, _ in seen} & set(paid)
    assert metrics["cand/win_rate"] == 1.0


def test_a_server_that_never_answers_times_out_in_time(judge_server):
    url, seen = judge_server(lambda request, headers, n: (None, b""))
    judge = OpenAIJudge(
        url, "judge-1", api_key_env=None, timeout=0.5, max_retries=1, backoff=0.05, progress=False
    )
    start = time.monotonic()
    with pytest.raises(PipelineError, match=r"no answer after 2 tries \(timed out after 0.5 s\)") as err:
        judge.judge([[{"role": "user", "content": "q"}]], ["a"], ["b"])
    elapsed = time.monotonic() - start
    assert elapsed < 2 * 0.5 + 0.05 + 1.0, elapsed  # two tries of 0.5 s, one back-off, slack
    assert "\n" not in str(err.value) and len(seen) == 2


def test_retries_with_back_off_then_clear_errors(judge_server, monkeypatch):
    # a busy server (503, then 429) is retried; the third try succeeds
    url, seen = judge_server(
        lambda r, h, n: (503, b"busy") if n == 1 else (429, b"") if n == 2 else (200, chat_completion("B"))
    )
    judge = OpenAIJudge(url, "judge-1", timeout=2, max_retries=3, backoff=0.05, concurrency=1, progress=False)
    start = time.monotonic()
    assert judge.judge([[{"role": "user", "content": "q"}]], ["a"], ["b"]) == [0.0]
    assert len(seen) == 3 and time.monotonic() - start >= 0.05 + 0.1  # waited 0.05 s, then 0.1 s
    # a refused key is not retried, and the message names the variable, never its value
    monkeypatch.setenv("EVAL_TEST_JUDGE_KEY", "wrong-key-value")
    url, seen = judge_server(lambda r, h, n: (401, b'{"error": "invalid api key"}'))
    judge = OpenAIJudge(url, "judge-1", api_key_env="EVAL_TEST_JUDGE_KEY", max_retries=3, progress=False)
    with pytest.raises(PipelineError, match="HTTP 401.*EVAL_TEST_JUDGE_KEY") as err:
        judge.judge([[{"role": "user", "content": "q"}]], ["a"], ["b"])
    assert len(seen) == 1 and "wrong-key-value" not in str(err.value)


def test_an_unreachable_judge_fails_before_generation(tmp_path, tiny_model_dir, other_model_dir, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls = stub_generation(monkeypatch, lambda name, text, s: ANSWERS[name])
    with pytest.raises(PipelineError, match=f"cannot connect to 127.0.0.1:{port}") as err:
        run_with_judge(tmp_path, tiny_model_dir, other_model_dir, f"http://127.0.0.1:{port}/v1")
    assert "\n" not in str(err.value) and calls == [] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_before_anything_is_written(tmp_path, tiny_model_dir, prompts_file):
    no_prompt = tmp_path / "no_prompt.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "hi", "tests": ["assert True"]}]), no_prompt)
    no_tests = tmp_path / "no_tests.jsonl"
    no_tests.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    model = str(tiny_model_dir)
    cases = [
        (["--models", model, "--prompts", str(no_prompt)], "has no prompt column: need one of prompt"),
        (["--models", str(tmp_path / "missing"), "--prompts", prompts_file], "models: folder not found"),
        (["--models", model, "--prompts", str(no_tests)], "no `tests` column"),
        (["--models", model, "--prompts", str(tmp_path / "nope.parquet")], "prompts: file not found"),
        (["--models", model, "--prompts", prompts_file, "--pass_k", "1", "5"], "pass_k: k=5 needs"),
        (["--models", model, "--prompts", prompts_file, "--scorers", "bleu"], "unknown scorer 'bleu'"),
        (["--models", model, "--prompts", prompts_file, "--scorers", "pairwise_judge"], "two or more models"),
        (["--models", model, "--prompts", prompts_file, "--num_samples", "3"], "greedy decoding"),
        (["--models", model, model, "--prompts", prompts_file], "two models are named"),
        (
            ["--models", model, "--prompts", prompts_file, "--prompt_column", "messages"],
            "no column 'messages'",
        ),
        (
            ["--models", model, "--prompts", prompts_file, "--scorers", "reward_model"],
            "reward_model_path is required",
        ),
        (["--models", model], "set exactly one of `prompts`"),
        (
            [
                "--models",
                model,
                "--prompts",
                prompts_file,
                "--scorers",
                "pairwise_judge",
                "--judge",
                "openai",
                "--models",
                model,
                model,
                "--model_names",
                "a",
                "b",
                "--judge_base_url",
                "localhost:8000",
            ],
            "not an http",
        ),  # fmt: skip
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace("`", ".")) as err:
            ev.main([*argv, "--output_dir", str(out)])
        assert "\n" not in str(err.value), argv
        assert not out.exists(), argv


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in ("models", "pass_k", "judge_base_url", "judge_api_key_env"))


def test_judge_diagnostics_count_each_kind_of_pair_once():
    """Identical answers, inconsistent verdicts and judged ties were all counted as `ties`, and the skipped
    identical pairs pulled the position-bias rate towards 0.5."""
    from pipeline.judges import PairResult, pair_diagnostics

    results = [
        PairResult(0.5, 0.5, identical=True),  # the same text twice: not judged
        PairResult(0.5, 0.5, identical=True),
        PairResult(1.0, 1.0),  # the first answer shown won both times: inconsistent
        PairResult(0.5, 0.5),  # a judged tie
        PairResult(1.0, 0.0),  # a won in both orders
        PairResult(None, 1.0),  # no verdict in one order
    ]
    found = pair_diagnostics(results)
    assert {k: found[k] for k in ("pairs", "identical", "inconsistent", "ties", "invalid")} == {
        "pairs": 6, "identical": 2, "inconsistent": 1, "ties": 1, "invalid": 1,
    }  # fmt: skip
    assert found["first_position_rate"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)  # judged pairs only


def test_answers_cut_at_max_new_tokens_are_counted(sft_setup):
    """An SFT model ends its answers (EOS) well within 64 tokens; at 2 tokens every answer is cut, and the
    count says so (eval reports it as `<model>/answers_cut_at_max_new_tokens` and logs it once)."""
    from pipeline.generation import generate_answers
    from pipeline.models import load_for_generation
    from pipeline.tokenization import render_prompt

    tokenizer, model = load_for_generation(sft_setup["model"])
    texts = [
        render_prompt(tokenizer, [{"role": "user", "content": p.prompt}]) for p in sft_setup["held_out"][:6]
    ]
    for max_new_tokens, expected in ((2, [True] * 6), (64, [False] * 6)):
        cut: list[bool] = []
        answers = generate_answers(
            tokenizer, model, texts, max_new_tokens=max_new_tokens, batch_size=4, cut=cut
        )
        assert cut == expected and len(answers) == 6, (max_new_tokens, answers)
