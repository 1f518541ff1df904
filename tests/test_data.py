"""Data file resolution and loading: forms accepted, and one-line errors for bad input."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.data import load_files, resolve_files, write_parquet_atomic
from pipeline.errors import PipelineError


def table(n):
    return pa.table({"text": [f"row {i}" for i in range(n)]})


def test_file_folder_glob_and_list_forms(tmp_path):
    for i in range(3):
        pq.write_table(table(2), tmp_path / f"part{i}.parquet")
    (tmp_path / "notes.txt").write_text("ignored in a folder")
    one = str(tmp_path / "part0.parquet")
    assert resolve_files(one) == [one]
    assert len(resolve_files(str(tmp_path))) == 3
    assert len(resolve_files(str(tmp_path / "part*.parquet"))) == 3
    assert len(resolve_files(f"{one},{tmp_path / 'part2.parquet'}")) == 2
    assert len(load_files(str(tmp_path))) == 6


@pytest.mark.parametrize(
    ("setup", "spec", "message"),
    [
        (None, "missing.parquet", "file not found: '{d}/missing.parquet'"),
        (None, "nomatch*.parquet", "no file matches '{d}/nomatch*.parquet'"),
        ("txt", "data.txt", "'{d}/data.txt' is not .parquet, .jsonl or .json"),
        ("mixed", "", "mixes parquet and json files"),
        ("empty", "empty.parquet", "'{d}/empty.parquet' has no rows"),
        ("corrupt", "bad.parquet", "cannot read {d}/bad.parquet"),
    ],
)
def test_bad_data_specs_name_the_file(tmp_path, setup, spec, message):
    d = str(tmp_path)
    if setup == "txt":
        (tmp_path / "data.txt").write_text("x")
    elif setup == "mixed":
        pq.write_table(table(1), tmp_path / "a.parquet")
        (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    elif setup == "empty":
        pq.write_table(table(0), tmp_path / "empty.parquet")
    elif setup == "corrupt":
        (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(PipelineError) as err:
        load_files(f"{d}/{spec}" if spec else d, "train_data")
    text = str(err.value)
    assert text.startswith("train_data: ") and message.format(d=d) in text
    assert "\n" not in text


def test_atomic_parquet_write_leaves_no_temp_file(tmp_path):
    path = write_parquet_atomic(table(3), tmp_path / "sub" / "out.parquet")
    assert pq.read_table(path).num_rows == 3
    assert [p.name for p in path.parent.iterdir()] == ["out.parquet"]


def test_synthetic_data_out_of_range_is_one_line(tmp_path, capsys):
    assert cli.main(["synthetic-data", "--output_dir", str(tmp_path / "d"), "--num_problems", "100000"]) == 2
    err = capsys.readouterr().err
    assert "num_problems must be in [0, 520]" in err and len(err.strip().splitlines()) == 1
