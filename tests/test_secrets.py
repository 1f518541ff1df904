"""Keys stay secret: one redaction for argv, configs, run records and logs; the judge's key goes only to its
configured origin; judge verdicts are cached so a rerun pays only for what is missing."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import pipeline.cli
from pipeline.errors import PipelineError
from pipeline.judges import OpenAIJudge
from pipeline.redaction import REDACTED, redact, redact_argv, redact_text

SECRET = "hf_SeCrEt0123456789"


def test_redaction_finds_nested_fields_and_url_credentials_but_not_tokenizer_tokens():
    config = {"hub_token": SECRET, "pad_token": "<|pad|>", "eos_token": "<|end|>", "reward_output_key": "reward",
              "max_new_tokens": 64, "judge_api_key_env": "OPENAI_API_KEY",
              "model_init_kwargs": {"token": SECRET, "dtype": "bfloat16"},
              "judge_base_url": f"https://user:{SECRET}@judge.example/v1?api_key={SECRET}&model=x"}  # fmt: skip
    clean = redact(config)
    assert SECRET not in json.dumps(clean)
    assert clean["model_init_kwargs"] == {"token": REDACTED, "dtype": "bfloat16"}
    assert {k: clean[k] for k in ("pad_token", "eos_token", "reward_output_key", "max_new_tokens",
                                  "judge_api_key_env")} == {k: config[k] for k in ("pad_token", "eos_token",
                                  "reward_output_key", "max_new_tokens", "judge_api_key_env")}  # fmt: skip
    assert clean["judge_base_url"].endswith("judge.example/v1?api_key=<redacted>&model=x")
    assert redact_argv(["--hub_token", SECRET, "--api_key=" + SECRET, "--pad_token", "<pad>"]) == [
        "--hub_token", REDACTED, f"--api_key={REDACTED}", "--pad_token", "<pad>"]  # fmt: skip
    assert SECRET not in redact_text(
        f"pipeline sft --hub_token {SECRET} {{'token': '{SECRET}'}} password={SECRET}"
    )


def test_a_hub_token_on_the_command_line_appears_in_no_file(
    tmp_path, tiny_model_dir, task_data, monkeypatch, capsys
):
    """Through `pipeline run` (argv in `.pipeline/*.json`, the printed commands) and through the CLI
    (`run.json`'s command and config, run.log): the token is in no file and no output."""
    from pipeline.stages import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # where the stages move the token to (restored after)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"output_dir: {tmp_path / 'runs'}\nstages:\n  - name: sft\n    stage: sft\n    args:\n"
        f"      model_name_or_path: {tiny_model_dir}\n      train_data: {task_data['sft_train']}\n"
        f'      hub_token: {SECRET}\n      model_init_kwargs: \'{{"token": "{SECRET}"}}\'\n'
        "      max_steps: 1\n      max_train_samples: 8\n      per_device_train_batch_size: 4\n      max_length: 64\n"
        "      bf16: false\n      dtype: float32\n      report_to: none\n      save_strategy: 'no'\n"
    )
    run.main([str(spec)])
    monkeypatch.setattr(sys, "argv", ["pipeline", "sft", "--hub_token", SECRET])
    assert pipeline.cli.main(["sft", "--model_name_or_path", str(tiny_model_dir), "--train_data",
                              task_data["sft_train"], "--hub_token", SECRET, "--max_steps", "1", "--max_train_samples",
                              "8", "--per_device_train_batch_size", "4", "--max_length", "64", "--bf16", "false",
                              "--dtype", "float32", "--report_to", "none", "--save_strategy", "no",
                              "--output_dir", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert SECRET not in " ".join(sys.argv)  # what W&B and every later reader of argv sees
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files) and any(p.parent.name == ".pipeline" for p in files)
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes() and p != spec]  # the user's own file
    assert leaks == []
    info = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert info["config"]["hub_token"] is None and REDACTED in info["command"]  # the key moved to HF_TOKEN


# ------------------------------------------------------------------------------------------------ judge


def serve(respond) -> tuple[str, list, ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1: `respond(handler, n)` answers request n; every request is recorded as
    (method, path, headers)."""
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.append((self.command, self.path, dict(self.headers), body))
            status, headers, reply = respond(self, len(seen))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = handle_any

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", seen, server


def completion(letter: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": letter}}]}).encode()


@pytest.mark.parametrize("status", [301, 302, 307])
def test_the_judge_key_is_not_sent_after_a_redirect(status, monkeypatch):
    monkeypatch.setenv("SECRETS_TEST_KEY", SECRET)
    other, other_seen, other_server = serve(lambda h, n: (200, {}, completion("A")))
    other = other.replace("127.0.0.1", "localhost")  # another origin
    origin, seen, server = serve(lambda h, n: (status, {"Location": f"{other}/v1/chat/completions"}, b""))
    try:
        judge = OpenAIJudge(f"{origin}/v1", "judge-1", api_key_env="SECRETS_TEST_KEY", max_retries=0,
                            progress=False)  # fmt: skip
        with pytest.raises(PipelineError, match=rf"redirected \(HTTP {status}\) to .*not followed"):
            judge.judge([[{"role": "user", "content": "q"}]], ["a"], ["b"])
        assert seen[0][2]["Authorization"] == f"Bearer {SECRET}"  # the configured origin (loopback) has it
        assert other_seen == []  # the other origin got nothing, least of all the key
    finally:
        for s in (server, other_server):
            s.shutdown()
            s.server_close()


def test_the_judge_key_goes_over_https_or_loopback_only(monkeypatch):
    monkeypatch.setenv("SECRETS_TEST_KEY", SECRET)

    def header(url, **kw):
        return OpenAIJudge(url, "m", api_key_env="SECRETS_TEST_KEY", progress=False, **kw)._headers()

    assert header("https://judge.example/v1")["Authorization"] == f"Bearer {SECRET}"
    assert header("http://127.0.0.1:8000/v1")["Authorization"] == f"Bearer {SECRET}"
    assert "Authorization" not in header("http://judge.example/v1")
    assert header("http://judge.example/v1", allow_http_key=True)["Authorization"] == f"Bearer {SECRET}"


def test_retry_after_is_honoured_and_huge_replies_are_refused(monkeypatch):
    import pipeline.judges.openai as judges

    waits = []
    monkeypatch.setattr(judges.time, "sleep", waits.append)
    origin, seen, server = serve(
        lambda h, n: (429, {"Retry-After": "7"}, b"") if n == 1 else (200, {}, completion("B"))
    )
    try:
        judge = OpenAIJudge(f"{origin}/v1", "m", api_key_env=None, backoff=0.01, progress=False)
        assert judge.judge([[{"role": "user", "content": "q"}]], ["a"], ["b"]) == [0.0]
        assert len(seen) == 2 and 7.0 <= waits[0] <= 7.0 * 1.25  # the server's wait, plus jitter
    finally:
        server.shutdown()
        server.server_close()
    origin, seen, server = serve(lambda h, n: (200, {}, b"x" * (judges.MAX_REPLY_BYTES + 10)))
    try:
        judge = OpenAIJudge(f"{origin}/v1", "m", api_key_env=None, progress=False)
        with pytest.raises(PipelineError, match="larger than 1 MiB"):
            judge.judge([[{"role": "user", "content": "q"}]], ["a"], ["b"])
    finally:
        server.shutdown()
        server.server_close()


def test_a_rerun_after_a_judge_failure_repeats_no_call(tmp_path):
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    first, second = [f"a{i}" for i in range(6)], [f"b{i}" for i in range(6)]
    # the endpoint answers 4 requests, then its key is revoked (401: not retried); later it is restored
    revoked = [False]

    def respond(handler, n):
        revoked[0] = revoked[0] or len(seen) == 5
        return (401, {}, b"{}") if revoked[0] else (200, {}, completion("A"))

    origin, seen, server = serve(respond)
    cache = tmp_path / "judge_verdicts.jsonl"
    try:
        judge = OpenAIJudge(
            f"{origin}/v1", "m", api_key_env=None, concurrency=1, progress=False, cache_path=cache
        )
        with pytest.raises(PipelineError, match="HTTP 401"):
            judge.judge(prompts, first, second)
        asked = [json.loads(body)["messages"][0]["content"] for _, _, _, body in seen[:4]]
        revoked[0], seen[:] = False, []
        judge = OpenAIJudge(
            f"{origin}/v1", "m", api_key_env=None, concurrency=1, progress=False, cache_path=cache
        )
        assert judge.judge(prompts, first, second) == [1.0] * 6
        again = [json.loads(body)["messages"][0]["content"] for _, _, _, body in seen]
        assert len(again) == 2 and not set(again) & set(asked) and judge.cached == 4
    finally:
        server.shutdown()
        server.server_close()
    assert len(Path(cache).read_text().splitlines()) == 6
