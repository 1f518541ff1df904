"""`python -m pipeline.launch [accelerate launch options] -m pipeline.cli STAGE ...`: `accelerate launch`, with a
stage's one-line error as the last line of the output, once, and exit status 2.

Under `accelerate launch` a stage that refuses its input (a `PipelineError`) fails on every rank, and the
launcher then prints its own traceback (`CalledProcessError`, or torch's `ChildFailedError` summary) below
the ranks' lines. Here every rank writes its error line to a file instead of the terminal
(`PIPELINE_ERROR_FILE`, read by `pipeline.cli`), the launcher's traceback is held back, and at the end the
first rank's line is printed once and the exit status is 2. A real crash (no error line from any rank)
keeps the launcher's output, traceback included, and its exit status. The scripts in `scripts/` launch
through this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ERROR_FILE_ENV = "PIPELINE_ERROR_FILE"


def first_error(path: str) -> str | None:
    """The error line of the lowest rank that wrote one (`RANK<TAB>message` lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
    except OSError:
        return None
    if not lines:
        return None
    return min(lines, key=lambda item: int(item[0]) if item[0].isdigit() else 1 << 30)[1]


class _Relay:
    """Passes the launcher's stderr through (progress bars' carriage returns included), three segments
    behind, until a traceback starts; from there on it holds everything, to be shown only if the run
    crashed. The lag lets the head of a chained exception (accelerate prints a bare `RuntimeError` and
    "The above exception was the direct cause ..." before its traceback) be held with it."""

    STARTS = (b"Traceback (most recent call last):", b"The above exception was the direct cause",
              b"During handling of the above exception")  # fmt: skip
    LAG = 3

    def __init__(self, out):
        self.out, self.partial, self.pending, self.held = out, b"", [], bytearray()

    def feed(self, chunk: bytes) -> None:
        if self.held:
            self.held += chunk
            return
        data, start = self.partial + chunk, 0
        for i, byte in enumerate(data):
            if byte in (10, 13):  # a segment ends at \n or \r
                self._segment(data[start : i + 1])
                start = i + 1
                if self.held:
                    self.held += data[start:]
                    self.partial = b""
                    return
        self.partial = data[start:]

    def _segment(self, segment: bytes) -> None:
        if segment.lstrip().startswith(self.STARTS):
            head = [s for s in self.pending if s.strip() and not _exception_name(s)]
            self.out.write(b"".join(head))
            self.held += b"".join(s for s in self.pending if s not in head) + segment
            self.pending = []
        else:
            self.pending.append(segment)
            while len(self.pending) > self.LAG:
                self.out.write(self.pending.pop(0))
        self.out.flush()

    def close(self) -> bytes:
        if not self.held:
            self.out.write(b"".join(self.pending) + self.partial)
            self.out.flush()
        return bytes(self.held)


def _exception_name(segment: bytes) -> bool:
    """A line that is just an exception's name (and message), as a chained exception's head prints."""
    text = segment.strip().split(b":", 1)[0]
    return text.replace(b".", b"").replace(b"_", b"").isalnum() and text.endswith((b"Error", b"Exception"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fd, error_file = tempfile.mkstemp(prefix="pipeline-error-", suffix=".txt")
    os.close(fd)
    env = {**os.environ, ERROR_FILE_ENV: error_file}
    command = [sys.executable, "-m", "accelerate.commands.launch", *argv]
    relay = _Relay(sys.stderr.buffer)
    try:
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        while chunk := os.read(proc.stderr.fileno(), 65536):
            relay.feed(chunk)
        code = proc.wait()
        message = first_error(error_file)
    except KeyboardInterrupt:
        return 130
    finally:
        os.unlink(error_file)
    held = relay.close()
    if code != 0 and message is not None:
        print(message, file=sys.stderr)
        return 2
    sys.stderr.buffer.write(held)
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
