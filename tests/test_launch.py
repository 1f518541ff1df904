"""`pipeline.launch`: the launcher's stderr passes through as it comes, a stage's error is printed once and
last, and a crash keeps its traceback."""

from __future__ import annotations

import io

from pipeline.launch import _Relay, first_error

ACCELERATE_TAIL = (b"RuntimeError\n\nThe above exception was the direct cause of the following exception:\n\n"
                   b"Traceback (most recent call last):\n  File \"launch.py\", line 1049\n"
                   b"subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 2.\n")  # fmt: skip


def relay(chunks: list[bytes]) -> tuple[bytes, bytes]:
    out = io.BytesIO()
    r = _Relay(out)
    for chunk in chunks:
        r.feed(chunk)
    held = r.close()
    return out.getvalue(), held


def test_output_passes_through_and_the_launchers_traceback_is_held():
    bar = [b"step 1/3\r", b"step 2/3\r", b"step 3/3\r", b"\n", b"loss 0.5\n"]
    shown, held = relay([*bar, ACCELERATE_TAIL[:30], ACCELERATE_TAIL[30:]])
    assert shown == b"".join(bar)  # carriage returns kept, nothing lost, nothing of the traceback
    assert held == ACCELERATE_TAIL  # the chained exception whole, its bare `RuntimeError` head included
    # no traceback: everything shown, even a last line without a newline
    shown, held = relay([b"a\n", b"b\r", b"c"])
    assert (shown, held) == (b"a\nb\rc", b"")


def test_the_lowest_rank_error_is_the_one_printed(tmp_path):
    path = tmp_path / "errors"
    path.write_text("3\tpipeline ips: error: from rank 3\n0\tpipeline ips: error: from rank 0\n")
    assert first_error(str(path)) == "pipeline ips: error: from rank 0"
    path.write_text("")
    assert first_error(str(path)) is None
    assert first_error(str(tmp_path / "missing")) is None
