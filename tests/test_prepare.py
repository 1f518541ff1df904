"""`pipeline prepare`: transforms, filters, split, views, manifest, and a catalogue of malformed inputs."""

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.stages import prepare

FENCE = "```"


def user(text):
    return json.dumps([{"role": "user", "content": text}])


def rows_for(groups):
    """groups: {prompt text: [reward, ...]} -> rows in the users' schema with fenced responses."""
    rows = []
    for p, (prompt, rewards) in enumerate(groups.items()):
        for j, reward in enumerate(rewards):
            rows.append({
                "uid": f"p{p}-r{j}",
                "prompt_pretokenized": user(prompt),
                "unprocessed_response": f"{FENCE}python\ndef f():\n    return {p * 10 + j}\n{FENCE}",
                "normalized_reward": float(reward),
            })  # fmt: skip
    return rows


def write(tmp_path, rows, name="data.parquet", schema=None):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def run(tmp_path, data, *flags):
    out = tmp_path / "out"
    manifest = prepare.main(["--data_path", data, "--output_dir", str(out), *flags])
    return out, manifest


def read(out, view, split="train"):
    files = sorted((out / view).glob(f"{split}-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def all_rl(out):
    return read(out, "rl", "train") + read(out, "rl", "eval")


def test_cleaning_removes_exactly_one_fence_and_keeps_return(tmp_path):
    rows = rows_for({"a": [1.0]})
    rows.append({**rows[0], "uid": "plain", "unprocessed_response": "return x"})
    two = f"{FENCE}\na\n{FENCE}\ntext\n{FENCE}\nb\n{FENCE}"
    rows.append({**rows[0], "uid": "two", "unprocessed_response": two})
    out, _ = run(tmp_path, write(tmp_path, rows), "--eval_fraction", "0")
    by_uid = {r["uid"]: r["unprocessed_response"] for r in all_rl(out)}
    assert by_uid["p0-r0"] == "def f():\n    return 0"
    assert by_uid["plain"] == "return x"  # never a character-set strip
    assert by_uid["two"] == two  # two blocks: not one enclosing fence, unchanged


def test_reward_clip_then_zscore(tmp_path):
    data = write(tmp_path, rows_for({"a": [-3.0, 0.0, 1.0, 5.0]}))
    out, _ = run(
        tmp_path, data, "--reward_clip", "-1.5,1.5", "--reward_normalize", "zscore", "--eval_fraction", "0"
    )
    got = [r["reward"] for r in sorted(all_rl(out), key=lambda r: r["uid"])]
    clipped = np.array([-1.5, 0.0, 1.0, 1.5])
    expected = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    raw = [r["normalized_reward"] for r in sorted(all_rl(out), key=lambda r: r["uid"])]
    assert raw == [-3.0, 0.0, 1.0, 5.0]  # the raw column is kept as it was


def test_minmax_and_rank_per_prompt(tmp_path):
    data = write(tmp_path, rows_for({"a": [0.0, 2.0, 4.0], "b": [10.0, 10.0, 30.0]}))
    out, _ = run(tmp_path, data, "--reward_normalize", "minmax", "--normalize_per_prompt", "true",
                 "--eval_fraction", "0")  # fmt: skip
    got = {r["uid"]: r["reward"] for r in all_rl(out)}
    assert [got[f"p0-r{j}"] for j in range(3)] == [0.0, 0.5, 1.0]
    assert [got[f"p1-r{j}"] for j in range(3)] == [0.0, 0.0, 1.0]
    out2 = tmp_path / "rank"
    prepare.main(["--data_path", data, "--output_dir", str(out2), "--reward_normalize", "rank",
                  "--normalize_per_prompt", "true", "--eval_fraction", "0"])  # fmt: skip
    got = {r["uid"]: r["reward"] for r in all_rl(out2)}
    assert [got[f"p0-r{j}"] for j in range(3)] == [-1.0, 0.0, 1.0]
    assert [got[f"p1-r{j}"] for j in range(3)] == [-0.5, -0.5, 1.0]  # tied rows share their mean rank


def test_filters_posonly_negonly_topk(tmp_path):
    data = write(tmp_path, rows_for({"a": [1.0, 0.8, 0.75, -1.0], "b": [0.9, 0.2, 0.1, 0.0]}))
    out, manifest = run(tmp_path, data, "--datafilter", "posonly", "--eval_fraction", "0")
    assert sorted(r["uid"] for r in all_rl(out)) == ["p0-r0", "p0-r1", "p1-r0"]  # > 0.75, strictly
    assert manifest["drops"]["datafilter_posonly"] == 5
    neg = tmp_path / "neg"
    prepare.main(
        ["--data_path", data, "--output_dir", str(neg), "--datafilter", "negonly", "--eval_fraction", "0"]
    )
    assert sorted(r["uid"] for r in all_rl(neg)) == ["p0-r3", "p1-r3"]
    top = tmp_path / "top"
    prepare.main(["--data_path", data, "--output_dir", str(top), "--datafilter", "topk_per_prompt", "--topk", "2",
                  "--eval_fraction", "0"])  # fmt: skip
    assert sorted(r["uid"] for r in all_rl(top)) == ["p0-r0", "p0-r1", "p1-r0", "p1-r1"]


def test_token_length_filter_counts_drops(tmp_path, tiny_model_dir):
    rows = rows_for({"a": [1.0, 0.5]})
    rows[1]["unprocessed_response"] = "x = 1\n" * 200
    out, manifest = run(tmp_path, write(tmp_path, rows), "--tokenizer_name_or_path", str(tiny_model_dir),
                        "--max_length", "64", "--eval_fraction", "0")  # fmt: skip
    assert [r["uid"] for r in all_rl(out)] == ["p0-r0"]
    assert manifest["drops"]["too_long"] == 1
    assert len(manifest["tokenizer_fingerprint"]) == 16


def test_split_by_prompt_never_leaks(tmp_path):
    groups = {f"prompt {i}": [0.1 * j for j in range(3)] for i in range(300)}
    out, _ = run(tmp_path, write(tmp_path, rows_for(groups)), "--eval_fraction", "0.2")
    train = {r["prompt_id"] for r in read(out, "rl", "train")}
    held = {r["prompt_id"] for r in read(out, "rl", "eval")}
    assert not train & held
    assert 0.12 < len(held) / 300 < 0.28  # a hash split: close to the fraction, not exact
    for view in ("sft", "pairs"):
        key = "messages" if view == "sft" else "prompt"
        tr = {json.dumps(r[key][0]) for r in read(out, view, "train")}
        ev = {json.dumps(r[key][0]) for r in read(out, view, "eval")}
        assert not tr & ev
    # deterministic: the same seed gives the same split, another seed another
    again, _ = run(
        tmp_path / "again", write(tmp_path, rows_for(groups), "d2.parquet"), "--eval_fraction", "0.2"
    )
    assert {r["prompt_id"] for r in read(again, "rl", "eval")} == held


def test_preference_pairs_respect_margin_and_prompt(tmp_path):
    data = write(tmp_path, rows_for({"a": [1.0, 0.9, -1.0, 0.0], "b": [0.5, 0.4], "c": [1.0]}))
    out, _ = run(tmp_path, data, "--pair_margin", "0.5", "--eval_fraction", "0")
    pairs = read(out, "pairs")
    assert [(p["chosen_uid"], p["rejected_uid"]) for p in pairs] == [("p0-r0", "p0-r2"), ("p0-r1", "p0-r3")]
    for p in pairs:
        assert p["chosen_reward"] - p["rejected_reward"] >= 0.5
        assert p["prompt"] == [{"role": "user", "content": "a"}]
        assert p["chosen"][0]["role"] == "assistant" and FENCE not in p["chosen"][0]["content"]


def test_pairs_view_alone_with_assistant_prefix_and_small_reads(tmp_path, monkeypatch):
    """views=pairs: the rl rows it reads back are not left behind; a prefix starts both answers; pairs joined
    in buckets of 3 from scattered rows of one prompt give the same pairs."""
    monkeypatch.setattr(prepare.stage, "PAIRS_PER_BUCKET", 3)  # where pass 3 reads it
    prefixed = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "def g():\n"}])
    rows = rows_for({f"prompt {i}": [1.0, -1.0, 0.9, -0.8] for i in range(5)})
    for row in rows[:4]:
        row["prompt_pretokenized"] = prefixed
    rows = rows[::2] + rows[1::2]  # responses to one prompt far apart in the file
    out, manifest = run(tmp_path, write(tmp_path, rows), "--views", "pairs", "--eval_fraction", "0",
                        "--batch_rows", "2")  # no pair's rows share a batch: all are joined in pass 3  # fmt: skip
    assert not (out / "rl").exists() and not (out / "sft").exists()
    assert sorted(os.listdir(out / "pairs")) == ["train-late-00000.parquet"]  # bucket files are gone
    assert manifest["rows_out"] == {"pairs_train": 10, "pairs_eval": 0}
    pairs = read(out, "pairs")
    assert sorted((p["chosen_uid"], p["rejected_uid"]) for p in pairs) == sorted(
        pair for i in range(5) for pair in ((f"p{i}-r0", f"p{i}-r1"), (f"p{i}-r2", f"p{i}-r3"))
    )
    first = next(p for p in pairs if p["chosen_uid"] == "p0-r0")
    assert first["prompt"] == [{"role": "user", "content": "q"}]
    assert first["chosen"][0]["content"] == "def g():\ndef f():\n    return 0"
    assert first["rejected"][0]["content"] == "def g():\ndef f():\n    return 1"


def test_pairs_written_while_reading_equal_pairs_read_back(tmp_path):
    """Pass 2 writes the pairs whose rows it reads in one batch; pairs straddling batches are read back in
    pass 3 (`late` shards). Both ways give the same pairs, with the same text and rewards, in both splits."""
    rows = rows_for({f"prompt {i}": [1.0, -1.0, 0.9, -0.8, 0.6] for i in range(12)})  # 2 pairs per prompt
    data = write(tmp_path, rows)
    outputs = {}
    for name, flags in (("together", []), ("straddling", ["--batch_rows", "4"])):
        out = tmp_path / name
        outputs[name] = out, prepare.main(["--data_path", data, "--output_dir", str(out), "--eval_fraction",
                                           "0.3", *flags])  # fmt: skip
    (together, m1), (straddling, m2) = outputs["together"], outputs["straddling"]
    assert (
        m1["rows_out"] == m2["rows_out"]
        and m1["rows_out"]["pairs_train"] + m1["rows_out"]["pairs_eval"] == 24
    )
    assert m1["rows_out"]["pairs_eval"] > 0
    assert not list((together / "pairs").glob("*late-*")) and list((straddling / "pairs").glob("*late-*"))
    assert list((straddling / "pairs").glob("train-0*")), "some pairs were still written in pass 2"
    for split in ("train", "eval"):
        key = lambda r: r["chosen_uid"]  # noqa: E731
        assert sorted(read(together, "pairs", split), key=key) == sorted(
            read(straddling, "pairs", split), key=key
        )


def test_sft_view_joins_assistant_prefix(tmp_path):
    prompt = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "def g():\n"}])
    rows = [{"uid": "u", "prompt_pretokenized": prompt, "unprocessed_response": "    return 1",
             "normalized_reward": 1.0}]  # fmt: skip
    out, _ = run(tmp_path, write(tmp_path, rows), "--eval_fraction", "0")
    [row] = read(out, "sft")
    assert row["messages"] == [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "def g():\n    return 1"}]  # fmt: skip


def test_dedupe_keep_first_and_manifest(tmp_path):
    rows = rows_for({"a": [1.0, 0.0]})
    rows.append({**rows[0], "normalized_reward": -1.0})  # same uid again
    data = write(tmp_path, rows)
    out, manifest = run(
        tmp_path, data, "--dedupe", "keep_first", "--eval_fraction", "0", "--row_group_size", "1"
    )
    got = {r["uid"]: r["reward"] for r in all_rl(out)}
    assert got == {"p0-r0": 1.0, "p0-r1": 0.0}
    assert manifest["drops"]["duplicate_uid"] == 1 and manifest["rows_in"] == 3
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["sources"][0]["sha256"] and on_disk["schema_version"] == 1
    assert on_disk["config"]["dedupe"] == "keep_first" and on_disk["rows_out"]["rl_train"] == 2
    assert pq.ParquetFile(out / "rl" / "train-00000.parquet").metadata.num_row_groups == 2
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_streams_multiple_files_and_batches(tmp_path):
    a = write(tmp_path, rows_for({"a": [1.0] * 5}), "a.parquet")
    rows_b = rows_for({"b": [0.5] * 7})
    for r in rows_b:
        r["uid"] = "b" + r["uid"]
    write(tmp_path, rows_b, "b.parquet")
    out, manifest = run(
        tmp_path, f"{a},{tmp_path / 'b.parquet'}", "--batch_rows", "3", "--eval_fraction", "0"
    )
    assert manifest["rows_in"] == 12 and len(all_rl(out)) == 12


# -------------------------------------------------------------------------------- malformed inputs

GOOD = rows_for({"a": [1.0, 0.0]})


def variant(**changes):
    return [{**GOOD[0], **changes}, GOOD[1]]


CATALOGUE = {
    "missing uid": ([{k: v for k, v in r.items() if k != "uid"} for r in GOOD], "missing column 'uid'"),
    "missing prompt": ([{k: v for k, v in r.items() if k != "prompt_pretokenized"} for r in GOOD],
                       "missing column 'prompt_pretokenized'"),
    "missing reward": ([{k: v for k, v in r.items() if k != "normalized_reward"} for r in GOOD],
                       "missing column 'normalized_reward'"),
    "missing response": ([{k: v for k, v in r.items() if k != "unprocessed_response"} for r in GOOD],
                         "missing column 'unprocessed_response'"),
    "reward as text": ([{**r, "normalized_reward": "high"} for r in GOOD], "column 'normalized_reward' must be numeric"),
    "uid as int": ([{**r, "uid": i} for i, r in enumerate(GOOD)], "column 'uid' must be strings"),
    "nan reward": (variant(normalized_reward=math.nan), "non-finite value (nan) at row 0, uid 'p0-r0'"),
    "inf reward": (variant(normalized_reward=math.inf), "non-finite value (inf) at row 0, uid 'p0-r0'"),
    "null reward": (variant(normalized_reward=None), "column 'normalized_reward' is null at row 0"),
    "null uid": (variant(uid=None), "column 'uid' is null at row 0"),
    "null prompt": (variant(prompt_pretokenized=None), "column 'prompt_pretokenized' is null at row 0"),
    "null response": (variant(unprocessed_response=None), "column 'unprocessed_response' is null at row 0"),
    "duplicate uid": ([GOOD[0], GOOD[0]], "column 'uid' has duplicates (first: 'p0-r0')"),
    "invalid json prompt": (variant(prompt_pretokenized='[{"role": "user", "content": '),
                            "column 'prompt_pretokenized' at row 0, uid 'p0-r0': invalid JSON"),
    "message without content": (variant(prompt_pretokenized='[{"role": "user"}]'), "message 0 has no string 'content'"),
    "first message not user": (variant(prompt_pretokenized='[{"role": "assistant", "content": "x"}]'),
                               "first message has role 'assistant'"),
    "empty message list": (variant(prompt_pretokenized="[]"), "must be a non-empty list"),
    "bad role": (variant(prompt_pretokenized='[{"role": "robot", "content": "x"}]'), "message 0 has role 'robot'"),
    "deeply nested prompt": (variant(prompt_pretokenized="[" * 100_000 + "]" * 100_000),
                             "uid 'p0-r0': JSON nested too deeply"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_malformed_rows_exit_2_one_line_no_output(tmp_path, capsys, case):
    rows, expected = CATALOGUE[case]
    data = write(tmp_path, rows)
    out = tmp_path / "out"
    code = cli.main(["prepare", "--data_path", data, "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and data in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def put(path, content):
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.parquet", b"", "not a readable parquet file"),
        ("csv.parquet", "name,reward\na,1\n", "not a readable parquet file"),
        ("nowhere.parquet", None, "data_path: file not found"),
        ("rows.txt", "x", "is not .parquet, .jsonl or .json"),
        ("bad.jsonl", '{"uid": "a"\n', "invalid JSON lines"),
        ("zero.parquet", pa.Table.from_pylist([], schema=pa.Table.from_pylist(GOOD).schema), "has no rows"),
    ],
)
def test_unreadable_inputs(tmp_path, capsys, name, content, expected):
    path = put(tmp_path / name, content)
    assert cli.main(["prepare", "--data_path", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_zero_rows_after_filtering(tmp_path, capsys):
    data = write(tmp_path, rows_for({"a": [0.1, 0.2]}))
    assert cli.main(["prepare", "--data_path", data, "--output_dir", str(tmp_path / "out"),
                     "--datafilter", "posonly"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "zero rows left after filtering" in err and "datafilter_posonly" in err
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_bad_options(tmp_path, capsys):
    data = write(tmp_path, GOOD)
    for flags, expected in (
        (["--reward_clip", "1.5"], "reward_clip must be 'lo,hi'"),
        (["--datafilter", "sometimes"], "invalid choice: 'sometimes'"),
        (["--max_length", "10"], "max_length needs tokenizer_name_or_path"),
        (["--views", "rl,dpo"], "views must be a comma-separated subset"),
    ):
        assert cli.main(["prepare", "--data_path", data, "--output_dir", str(tmp_path / "o"), *flags]) == 2
        assert expected in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli.main(["prepare", "--data_path", data, "--output_dir", str(tmp_path / "exists")]) == 2
    assert "exists; choose another or pass --overwrite true" in capsys.readouterr().err


def test_jsonl_input_and_plain_text_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"uid": "a", "prompt_pretokenized": "plain question", "unprocessed_response": "x",
                                "normalized_reward": 1}) + "\n")  # fmt: skip
    out, _ = run(tmp_path, str(path), "--eval_fraction", "0")
    assert read(out, "sft")[0]["messages"][0] == {"role": "user", "content": "plain question"}


def test_validation_shared_with_a_worker_reports_the_first_bad_row(tmp_path):
    """Pass 1 runs over row groups in this process and a worker; an error found by the worker arrives as the
    same one line, and with bad rows in two row groups the earlier one is named."""
    rows = rows_for({f"prompt {i}": [0.5, -0.5] for i in range(40)})  # 80 rows in 8 row groups of 10
    rows[75]["normalized_reward"] = math.nan
    data = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=10)
    out = tmp_path / "out"
    argv = ["--data_path", data, "--output_dir", str(out), "--num_proc", "2"]
    with pytest.raises(prepare.PipelineError, match=r"d.parquet: column 'normalized_reward' has a non-finite "
                       r"value \(nan\) at row 75, uid 'p37-r1'$"):  # fmt: skip
        prepare.main(argv)
    rows[12]["normalized_reward"] = math.inf
    pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=10)
    with pytest.raises(prepare.PipelineError, match=r"\(inf\) at row 12, uid 'p6-r0'$"):
        prepare.main(argv)
    assert not out.exists()


def test_two_worker_processes_write_the_same_rows(tmp_path, tiny_model_dir):
    groups = {f"prompt {i}": [0.25 * (j % 5) - 0.5 for j in range(4)] for i in range(60)}
    data = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows_for(groups)), data, row_group_size=40)  # 6 row groups to share
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        manifest = prepare.main(["--data_path", data, "--output_dir", str(out), "--num_proc", workers,
                                 "--eval_fraction", "0.2", "--tokenizer_name_or_path", str(tiny_model_dir),
                                 "--max_length", "60"])  # fmt: skip
        outputs[workers] = (out, manifest)
    (one, m1), (two, m2) = outputs["1"], outputs["2"]
    assert m1["rows_out"] == m2["rows_out"] and m1["drops"] == m2["drops"]
    assert len(list((two / "rl").glob("train-w001-*.parquet"))) == 1  # the second worker wrote its own shard
    for view, key in (("rl", "uid"), ("sft", "uid"), ("pairs", "chosen_uid")):
        for split in ("train", "eval"):
            a = sorted(read(one, view, split), key=lambda r: r[key])
            b = sorted(read(two, view, split), key=lambda r: r[key])
            assert a == b, (view, split)


def test_reward_key_named_like_the_output_column(tmp_path):
    # logs whose reward column is called `reward`, the name prepare writes its transformed reward to
    rows = [
        {**r, "reward": r.pop("normalized_reward")} for r in rows_for({"a": [1.0, -1.0, 0.0], "b": [2.0]})
    ]
    out, manifest = run(tmp_path, write(tmp_path, rows), "--reward_key", "reward", "--reward_normalize", "zscore",
                        "--eval_fraction", "0")  # fmt: skip
    got = {r["uid"]: r for r in all_rl(out)}
    assert manifest["columns"] == {
        "reward": "reward",
        "response": "unprocessed_response",
        "raw_reward": "raw_reward",
    }
    raw = np.array([1.0, -1.0, 0.0, 2.0])
    for row, value in zip(rows, (raw - raw.mean()) / raw.std(), strict=True):
        assert got[row["uid"]]["raw_reward"] == row["reward"]  # the input's values, kept under the new name
        assert got[row["uid"]]["reward"] == pytest.approx(value)  # the transformed ones under the usual name
    schema = pq.read_schema(next((out / "rl").glob("train-*.parquet")))
    assert schema.names.count("reward") == 1
    # both names taken, or an input column the views write: one line each
    both = [{**r, "raw_reward": 0.0} for r in rows]
    with pytest.raises(prepare.PipelineError, match="columns 'reward' and 'raw_reward' both exist"):
        run(tmp_path / "both", write(tmp_path, both, "both.parquet"), "--reward_key", "reward")
    with pytest.raises(prepare.PipelineError, match="column 'prompt_id' is written by prepare"):
        pid = write(tmp_path, [{**r, "prompt_id": 1} for r in rows], "pid.parquet")
        run(tmp_path / "pid", pid, "--reward_key", "reward")
    assert not (tmp_path / "both").exists() and not (tmp_path / "pid").exists()


def test_oversized_text_is_counted_and_dropped_before_parsing_or_tokenizing(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A response over max_text_bytes never reaches the tokenizer, a prompt over it never reaches the JSON
    parser; both are counted; their pairs go with them and the other rows keep theirs."""
    rows = rows_for({"a": [1.0, 0.0, 0.5], "b": [1.0, 0.0]})
    rows[1]["unprocessed_response"] = "x" * 5_000  # a's worst answer: its pair with a's best goes too
    rows[3]["prompt_pretokenized"] = json.dumps([{"role": "user", "content": "b" * 5_000}])
    import pipeline.stages.prepare.views as prep

    seen = []
    real = prep.token_lengths
    monkeypatch.setattr(prep, "token_lengths", lambda tok, p, r: seen.extend(r) or real(tok, p, r))
    data = write(tmp_path, rows)
    for extra in ([], ["--tokenizer_name_or_path", str(tiny_model_dir), "--max_length", "4096"]):
        out, manifest = run(tmp_path / str(len(extra)), data, "--eval_fraction", "0", "--max_text_bytes", "4000",
                            "--pair_margin", "0.1", *extra)  # fmt: skip
        assert sorted(r["uid"] for r in all_rl(out)) == ["p0-r0", "p0-r2", "p1-r1"]
        assert manifest["drops"]["text_too_large"] == 2
        pairs = read(out, "pairs")
        assert [(p["chosen_uid"], p["rejected_uid"]) for p in pairs] == [("p0-r0", "p0-r2")]
    assert seen and all(len(r) < 4000 for r in seen)


def test_identical_texts_are_never_paired(tmp_path, tiny_model_dir):
    """Two responses that clean to the same text (here: one fenced, one bare) with rewards 1 and -1 would be a
    pair teaching nothing but noise: left out and counted, whichever pass writes the pairs."""
    rows = rows_for({"a": [1.0, -1.0], "b": [1.0, -1.0], "c": [1.0, 0.5, -0.5, -1.0]})
    rows[1]["unprocessed_response"] = "def f():\n    return 0"  # a's two answers: the same after cleaning
    rows[6]["unprocessed_response"] = rows[5]["unprocessed_response"]  # c's 2nd-best and 2nd-worst: same text
    data = write(tmp_path, rows)
    for name, flags in (("together", []), ("straddling", ["--batch_rows", "1"]),
                        ("after_length_filter", ["--tokenizer_name_or_path", str(tiny_model_dir),
                                                 "--max_length", "256"])):  # fmt: skip
        out = tmp_path / name
        manifest = prepare.main(
            ["--data_path", data, "--output_dir", str(out), "--eval_fraction", "0", *flags]
        )
        pairs = read(out, "pairs")
        assert sorted((p["chosen_uid"], p["rejected_uid"]) for p in pairs) == [
            ("p1-r0", "p1-r1"), ("p2-r0", "p2-r3")], name  # fmt: skip
        assert all(p["chosen"] != p["rejected"] for p in pairs)
        assert manifest["drops"]["identical_pairs"] == 2 and manifest["rows_out"]["pairs_train"] == 2, name
