"""`pipeline logp`: exact against a naive fp32 computation, multi-rank = single process, resumable, safe."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import PipelineError
from pipeline.stages import logp, prepare
from pipeline.tiny import make_tiny_model
from pipeline.tokenization import parse_prompt, tokenize_prompt_response

MAX_LENGTH = 96


def build_rows():
    """Very different lengths, an assistant prefix, and responses long enough to be truncated."""
    rows = []
    for i in range(40):
        body = "\n".join(f"    y{j} = x + {j}" for j in range(i % 9 * (i % 4 + 1)))
        prompt = [{"role": "user", "content": f"Write f{i}(x)." + " Please." * (i % 5)}]
        if i % 7 == 3:
            prompt.append({"role": "assistant", "content": f"def f{i}(x):\n"})
        rows.append({
            "uid": f"u{i:03d}",
            "prompt_pretokenized": json.dumps(prompt),
            "unprocessed_response": f"```python\ndef f{i}(x):\n{body}\n    return x\n```",
            "normalized_reward": float(i % 3 - 1),
        })  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("logp")
    pq.write_table(pa.Table.from_pylist(build_rows()), root / "rows.parquet")
    out = root / "prepared"
    prepare.main(["--data_path", str(root / "rows.parquet"), "--output_dir", str(out),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0.2"])  # fmt: skip
    return out


def load_logps(folder):
    table = pa.concat_tables([pq.read_table(p) for p in sorted(Path(folder).glob("*-part-*.parquet"))])
    return {r["uid"]: r for r in table.to_pylist()}


def run_logp(prepared, tiny_model_dir, out, *flags):
    return logp.main(["--data_path", str(prepared), "--model_name_or_path", str(tiny_model_dir),
                      "--output_dir", str(out), "--max_length", str(MAX_LENGTH), *flags])  # fmt: skip


@pytest.mark.parametrize(
    "flags",
    [
        # a small token budget forces padded multi-row batches; a small chunk splits the lm_head pass
        ["--token_budget", "300", "--lm_head_chunk", "37"],
        # packed, padding-free rows of several samples each; flex_attention is not tested here: torch 2.13's
        # CPU inductor fails to compile its kernel for this model shape (CppCompileError)
        ["--packing", "true", "--pack_row_tokens", "400", "--token_budget", "800", "--lm_head_chunk", "50"],
    ],
    ids=["padded", "packed-sdpa"],
)
def test_logps_equal_naive_full_vocab_fp32(tmp_path, prepared, tiny_model_dir, flags):
    out = tmp_path / "logps"
    manifest = run_logp(prepared, tiny_model_dir, out, "--part_rows", "9", *flags)
    stored = load_logps(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rl = pa.concat_tables([pq.read_table(p) for p in sorted((prepared / "rl").glob("*.parquet"))]).to_pylist()
    assert len(stored) == len(rl) == sum(manifest["rows"].values())
    truncated = prefixed = 0
    for row in rl:
        messages = parse_prompt(row["prompt_pretokenized"])
        [sample] = tokenize_prompt_response(tokenizer, [messages], [row["unprocessed_response"]], MAX_LENGTH)
        ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            full = model(ids, use_cache=False).logits.float().log_softmax(-1)[0]
        positions = torch.arange(sample.prompt_len - 1, len(sample.input_ids) - 1)
        expected = full[positions, ids[0, positions + 1]].numpy()
        got = np.array(stored[row["uid"]]["logps"])
        assert got.shape == expected.shape and len(got) > 0
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert stored[row["uid"]]["n_tokens"] == len(expected)
        assert stored[row["uid"]]["sum_logp"] == pytest.approx(
            float(expected.astype(np.float64).sum()), abs=1e-4
        )
        truncated += stored[row["uid"]]["truncated"]
        prefixed += len(messages) == 2
    assert truncated >= 3 and prefixed >= 3  # the cases this test exists for really occurred
    assert sum(manifest["truncated"].values()) == truncated  # every cut response is counted in the manifest
    assert manifest["max_length"] == MAX_LENGTH and manifest["dtype"] == "float32"
    assert manifest["tokenizer_fingerprint"] and manifest["model_fingerprint"]


def test_two_ranks_equal_one_process(tmp_path, prepared, tiny_model_dir):
    single, double = tmp_path / "one", tmp_path / "two"
    run_logp(prepared, tiny_model_dir, single, "--part_rows", "7", "--token_budget", "400")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pipeline.cli", "logp", "--data_path", str(prepared), "--model_name_or_path", str(tiny_model_dir),
           "--output_dir", str(double), "--max_length", str(MAX_LENGTH), "--part_rows", "7",
           "--token_budget", "400"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((double / "manifest.json").read_text())["world_size"] == 2
    parts = sorted(p.name for p in single.glob("*-part-*.parquet"))
    assert parts == sorted(p.name for p in double.glob("*-part-*.parquet")) and len(parts) >= 4
    for name in parts:
        assert pq.read_table(single / name).equals(pq.read_table(double / name)), name


def test_killed_run_resumes_without_recomputing(tmp_path, prepared, tiny_model_dir):
    reference, out = tmp_path / "ref", tmp_path / "resumed"
    run_logp(prepared, tiny_model_dir, reference, "--part_rows", "1")
    cmd = [sys.executable, "-m", "pipeline.cli", "logp", "--data_path", str(prepared), "--model_name_or_path",
           str(tiny_model_dir), "--output_dir", str(out), "--max_length", str(MAX_LENGTH), "--part_rows", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while not list(out.glob("*-part-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*-part-*.parquet")}
    total = len(list(reference.glob("*-part-*.parquet")))
    assert 1 <= len(done) < total, (
        len(done),
        total,
        proc.returncode,
    )  # killed after the first part, before the last
    assert not (out / "manifest.json").exists()
    # the part a killed writer had begun (the kill above leaves one only when it lands mid-write)
    (out / f".train-part-{total - 1:05d}.parquet.tmp-999999").write_bytes(b"PAR1 half written")
    run_logp(prepared, tiny_model_dir, out, "--part_rows", "1")
    for name, mtime in done.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished parts were not recomputed
    resumed, full = load_logps(out), load_logps(reference)
    assert resumed.keys() == full.keys()
    for uid, row in full.items():  # parts scored by another process: equal up to float rounding at most
        assert resumed[uid]["n_tokens"] == row["n_tokens"]
        np.testing.assert_allclose(resumed[uid]["logps"], row["logps"], atol=1e-6, rtol=0)
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_bad_inputs_are_clear(tmp_path, prepared, tiny_model_dir, capsys):
    from pipeline import cli

    (tmp_path / "not_prepared").mkdir()
    assert cli.main(["logp", "--data_path", str(tmp_path / "not_prepared"), "--model_name_or_path",
                     str(tiny_model_dir)]) == 2  # fmt: skip
    assert "no manifest.json" in capsys.readouterr().err
    other = make_tiny_model(tmp_path / "other", vocab_size=700)
    assert cli.main(["logp", "--data_path", str(prepared), "--model_name_or_path", str(other),
                     "--output_dir", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "prepared with tokenizer" in err and "rerun prepare with this tokenizer" in err
    out = tmp_path / "mixed"
    run_logp(prepared, tiny_model_dir, out, "--max_parts", "1", "--part_rows", "5")
    assert cli.main(["logp", "--data_path", str(prepared), "--model_name_or_path", str(tiny_model_dir),
                     "--output_dir", str(out), "--max_length", "64", "--part_rows", "5"]) == 2  # fmt: skip
    assert "holds logps of another job (max_length differ)" in capsys.readouterr().err


def test_import_old_pickles(tmp_path):
    source = tmp_path / "old"
    source.mkdir()
    for rank in range(2):
        with open(source / f"rank{rank}.pkl", "wb") as fh:
            pickle.dump({f"r{rank}-{i}": np.arange(i + 1, dtype=np.float64) * -0.5 for i in range(3)}, fh)
    with pytest.raises(
        PipelineError, match=r"unpickles it, which runs any code .* pass --trust_pickles true"
    ):
        logp.main(["--import_pickles", str(source), "--output_dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    manifest = logp.main(
        ["--import_pickles", str(source), "--trust_pickles", "true", "--output_dir", str(tmp_path / "new")]
    )
    rows = load_logps(tmp_path / "new")
    assert len(rows) == 6 and rows["r1-2"]["logps"] == [0.0, -0.5, -1.0] and rows["r1-2"]["n_tokens"] == 3
    assert manifest["tokenizer_fingerprint"] is None and "not possible" in manifest["tokenizer_check"]


REPO = Path(__file__).resolve().parents[1]


def test_run_logp_script_default_token_budget_is_8_rows_of_ml():
    env = {**os.environ, "dryrun": "1", "gpu": "0", "ml": "96"}
    env.pop("bsz", None)
    out = subprocess.run(["bash", str(REPO / "scripts/run_logp.sh"), "d/", "m", "t1"], capture_output=True,
                         text=True, env=env, check=True).stdout.split()  # fmt: skip
    for flag, value in (
        ("--max_length", "96"),
        ("--token_budget", str(8 * 96)),
        ("--output_dir", "d_t1_logp"),
    ):
        assert out[out.index(flag) + 1] == value, flag


def test_launch_command_for_multi_node():
    env = {**os.environ, "dryrun": "1", "gpu": "8", "WORKER_NUM": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0",
           "MASTER_PORT": "1234", "bsz": "4", "ml": "1000"}  # fmt: skip
    out = subprocess.run(["bash", str(REPO / "scripts/run_logp.sh"), "d/", "m", "x", "--part_rows", "64"],
                         capture_output=True, text=True, env=env, check=True).stdout.split()  # fmt: skip
    assert (
        out[1:3] == ["-m", "pipeline.launch"] and "--multi_gpu" in out
    )  # accelerate launch, errors kept short
    for flag, value in (("--num_processes", "16"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "node0"), ("--main_process_port", "1234"),
                        ("--output_dir", "d_x_logp"), ("--token_budget", "4000"), ("--part_rows", "64")):  # fmt: skip
        assert out[out.index(flag) + 1] == value, flag
