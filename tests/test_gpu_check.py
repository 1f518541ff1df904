"""`bash bench/gpu_check.sh` in its CPU smoke mode: every kind of result line, so the GPU check keeps working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_mode_writes_every_result(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    environment = json.loads((tmp_path / "out" / "env.json").read_text())
    assert environment["mode"] == "smoke" and environment["torch"] and "flex_attention" in environment
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) >= 6
    names = [r["variant"] for r in rows]
    assert names[:3] == [
        "logp naive (fp32 log-softmax, padded batch 8)",
        "logp ours padded",
        "logp ours packed",
    ]
    assert names[3:6] == ["sft trl defaults", "sft ours", "ips ours"]
    for row in rows[:6]:
        assert row["tokens_per_s"] > 0 and row["peak_gib"] > 0, row
    for row in rows[:3]:  # every scoring variant against the fp32 reference (fp32 on a CPU: equal to 1e-4)
        assert 0 <= row["max_abs_diff"] < 1e-4, row
    check = rows[6]
    assert (
        check["variant"] == "check predicted peak (ips)"
        and check["peak_gib"] > 0
        and check["measured_peak_gib"] > 0
    )
