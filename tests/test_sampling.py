"""Smaller training sets are nested, prompt by prompt, and the same for every run seed."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import load_train_eval
from pipeline.sampling import nested_ids_order


def _file(tmp_path, prompts, per_prompt):
    rows = [{"messages": [{"role": "user", "content": f"q{p}"}, {"role": "assistant", "content": f"a{p}.{r}"}]}
            for p in prompts for r in range(per_prompt)]  # fmt: skip
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _prompts(dataset):
    return [m[0]["content"] for m in dataset["messages"]]


def test_max_train_samples_is_nested_and_the_same_for_every_run_seed(tmp_path):
    data = _file(tmp_path, range(30), 3)

    def load(n, seed):
        args = SimpleNamespace(train_data=data, eval_data=None, dataset_name=None, max_train_samples=n,
                               max_eval_samples=None)  # fmt: skip
        return load_train_eval(args, seed)[0]

    small, large = load(12, seed=1), load(30, seed=2)
    assert load(12, seed=3)["messages"] == small["messages"]  # the run seed plays no part
    assert large["messages"][:12] == small["messages"]  # nested
    prompts = _prompts(large)
    assert len(set(prompts)) == 10 and all(prompts.count(p) == 3 for p in set(prompts))  # whole prompts
    assert prompts != sorted(prompts, key=lambda p: int(p[1:]))  # ordered by hash, not by the file


def test_numeric_nested_order_groups_prompts_and_ignores_the_pool():
    prompt_ids = np.repeat(np.arange(50, dtype=np.uint64), 4)
    order = nested_ids_order(prompt_ids, np.arange(200))
    grouped = prompt_ids[order]
    assert all((grouped[i : i + 4] == grouped[i]).all() for i in range(0, 200, 4))  # prompt by prompt
    # a pool with one prompt less orders the prompts it shares alike
    fewer = prompt_ids != 7
    kept = prompt_ids[fewer][nested_ids_order(prompt_ids[fewer], np.arange(200)[fewer])]
    first = list(dict.fromkeys(grouped.tolist()))
    assert list(dict.fromkeys(kept.tolist())) == [p for p in first if p != 7]
