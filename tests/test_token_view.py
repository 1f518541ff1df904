"""The tokenized view (`pipeline.token_view`): rows and logps equal a direct tokenization and the store,
reuse and rebuild by identity, a killed build resumes, two processes share one cache, the uid join."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline import token_view as tv
from pipeline.data import read_prepared_split
from pipeline.errors import PipelineError
from pipeline.logp_store import read_logps
from pipeline.stages import logp, prepare
from pipeline.tokenization import parse_prompt, tokenize_prompt_response

MAX_LENGTH = 96
PART_ROWS = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, task_data):
    root = tmp_path_factory.mktemp("view")
    prepare.main(["--data_path", task_data["coderl_train"], "--output_dir", str(root / "prepared"),
                  "--tokenizer_name_or_path", str(tiny_model_dir), "--eval_fraction", "0.1"])  # fmt: skip
    logp.main(["--data_path", str(root / "prepared"), "--model_name_or_path", str(tiny_model_dir),
               "--max_length", str(MAX_LENGTH), "--part_rows", "24"])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def request(store, cache, **changes):
    fields = dict(data_path=str(store / "prepared"), split="train", max_length=MAX_LENGTH,
                  response_key="unprocessed_response", logp_dir=str(store / "prepared_ref_logp"),
                  cache_dir=str(cache), part_rows=PART_ROWS)  # fmt: skip
    return tv.ViewRequest(**{**fields, **changes})


def test_rows_and_logps_equal_a_direct_tokenization_and_the_store(tmp_path, store, tokenizer):
    view = tv.token_view(request(store, tmp_path), tokenizer)
    table = read_prepared_split(store / "prepared", "rl", "train", ["uid", "prompt_pretokenized",
                                                                     "unprocessed_response"])  # fmt: skip
    samples = tokenize_prompt_response(tokenizer, [parse_prompt(p) for p in table.column(1).to_pylist()],
                                       table.column(2).to_pylist(), MAX_LENGTH)  # fmt: skip
    stored = read_logps(store / "prepared_ref_logp")
    rows = view.dataset[:]
    assert view.rows == table.num_rows == len(rows["uid"]) > 3 * PART_ROWS
    assert rows["uid"] == table.column("uid").to_pylist()
    assert rows["row"] == list(range(table.num_rows))
    assert rows["input_ids"] == [s.input_ids for s in samples]
    assert rows["prompt_len"] == [s.prompt_len for s in samples]
    assert rows["response_len"] == [s.response_len for s in samples]
    for uid, values in zip(rows["uid"], rows["ref_logps"], strict=True):
        np.testing.assert_array_equal(np.asarray(values, np.float32), stored[uid])
    assert view.has_logps().all() and not view.reused


def test_reused_when_unchanged_and_rebuilt_when_an_input_changes(tmp_path, store, tokenizer, tiny_model_dir):
    first = tv.token_view(request(store, tmp_path), tokenizer)
    again = tv.token_view(request(store, tmp_path), tokenizer)
    assert again.reused and again.folder == first.folder
    untrimmed = tv.token_view(request(store, tmp_path, logp_dir=None), tokenizer)  # no store: tokens only
    shorter = tv.token_view(request(store, tmp_path, logp_dir=None, max_length=64), tokenizer)
    assert not shorter.reused and len({first.folder, untrimmed.folder, shorter.folder}) == 3
    assert max(shorter.column("prompt_len") + shorter.column("response_len")) <= 64
    # another tokenizer (one more special token) and another store give other views
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tv.token_view(request(store, tmp_path), other).folder != first.folder
    copy = tmp_path / "store_copy"
    shutil.copytree(store / "prepared_ref_logp", copy, ignore=shutil.ignore_patterns("token_views"))
    part = sorted(copy.glob("train-part-*.parquet"))[0]
    pq.write_table(pq.read_table(part), part)  # written again: another store
    assert tv.token_view(request(store, tmp_path, logp_dir=str(copy)), tokenizer).folder != first.folder


def test_a_killed_build_resumes_where_it_stopped(tmp_path, store, tokenizer, monkeypatch):
    whole = tv.token_view(request(store, tmp_path / "whole"), tokenizer)
    real, calls = tv.build_part, []

    def dies_on_the_third(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while building part 2
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "build_part", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        tv.token_view(request(store, tmp_path / "killed"), tokenizer)
    folder = next((tmp_path / "killed" / "token_views").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [
        "part-00000.arrow",
        "part-00001.arrow",
    ]  # no view.json
    monkeypatch.setattr(tv, "build_part", real)
    built = tv.build_parts(request(store, tmp_path / "killed"), tokenizer, folder)
    assert built == -(-whole.rows // PART_ROWS) - 2  # only the missing parts
    resumed = tv.token_view(request(store, tmp_path / "killed"), tokenizer)
    assert resumed.dataset[:] == whole.dataset[:]


def test_two_processes_share_one_cache(tmp_path, store, tiny_model_dir):
    script = (
        "import sys; from transformers import AutoTokenizer; from pipeline import token_view as tv\n"
        f"r = tv.ViewRequest({str(store / 'prepared')!r}, 'train', {MAX_LENGTH}, 'unprocessed_response', "
        f"{str(store / 'prepared_ref_logp')!r}, {str(tmp_path)!r}, 8)\n"
        f"v = tv.token_view(r, AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}))\n"
        "print(v.folder, v.rows, v.reused)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    folders = {r[0].split()[0] for r in results}
    assert len(folders) == 1  # one cache
    folder = Path(folders.pop())
    info = json.loads((folder / "view.json").read_text())
    assert sorted(p.name for p in folder.glob("part-*.arrow")) == [
        f"part-{i:05d}.arrow" for i in range(info["parts"])
    ]
    assert not list(folder.glob(".*tmp*"))  # no half-written part left behind
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    view = tv.token_view(request(store, tmp_path, part_rows=8), tokenizer)
    assert view.reused and view.folder == folder and view.rows == int(results[0][0].split()[1])


def test_a_store_not_in_split_order_is_joined_by_uid(tmp_path, store, tokenizer):
    shuffled = tmp_path / "shuffled"
    shutil.copytree(store / "prepared_ref_logp", shuffled, ignore=shutil.ignore_patterns("token_views"))
    parts = sorted(shuffled.glob("*-part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    for p in parts:
        p.unlink()
    order = np.random.default_rng(0).permutation(table.num_rows)
    pq.write_table(table.take(pa.array(order)), shuffled / "imported-part-00000.parquet")
    manifest = json.loads((shuffled / "manifest.json").read_text())
    manifest.pop("prepare_manifest_sha256")  # as an imported store: no binding to the prepared rows
    (shuffled / "manifest.json").write_text(json.dumps(manifest))
    view = tv.token_view(request(store, tmp_path, logp_dir=str(shuffled)), tokenizer)
    stored = read_logps(store / "prepared_ref_logp")
    rows = view.dataset[:]
    for uid, values in zip(rows["uid"], rows["ref_logps"], strict=True):
        np.testing.assert_array_equal(np.asarray(values, np.float32), stored[uid])


def test_logps_of_another_length_are_refused(tmp_path, store, tokenizer):
    with pytest.raises(PipelineError, match=r"response tokens here but \d+ stored logps"):
        tv.token_view(request(store, tmp_path, max_length=24), tokenizer)


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, store, tokenizer):
    with pytest.raises(PipelineError, match=r"train-\d+\.parquet: no column 'nope' \(it has uid"):
        read_prepared_split(store / "prepared", "rl", "train", ["uid", "nope"])
    with pytest.raises(PipelineError, match="token_view_dir: cannot create '/proc/nope"):
        tv.token_view(request(store, "/proc/nope"), tokenizer)
    with pytest.raises(PipelineError, match="no column .missing."):
        tv.token_view(request(store, tmp_path, response_key="missing"), tokenizer)
    assert not (tmp_path / "token_views").exists() or not list((tmp_path / "token_views").rglob("part-*"))
