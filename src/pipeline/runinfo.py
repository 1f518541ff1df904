"""Run metadata (`run.json`), per-run log files and experiment tracking, shared by every stage.

`run.json` is written when a stage starts (status "running") and rewritten when it ends ("completed" or
"failed"), always atomically, so a reader never sees half a file and a chained pipeline can tell a finished
stage from an interrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.redaction import redact_argv

RUN_FILE = "run.json"
LOG_FILE = "run.log"
_PACKAGES = (
    "pipeline",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "deepspeed",
    "bitsandbytes",
    "wandb",
    "pyarrow",
)

logger = logging.getLogger("pipeline")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def config_dict(*configs: Any) -> dict[str, Any]:
    """Flatten the stage's dataclasses into one JSON-safe mapping, secrets redacted at any depth."""
    from pipeline.redaction import redact

    out: dict[str, Any] = {}
    for cfg in configs:
        if cfg is None:
            continue
        for f in dataclasses.fields(cfg):
            if not f.name.startswith("_"):
                out[f.name] = redact(_jsonable(getattr(cfg, f.name)), f.name)
    return out


def git_state(start: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout holding `start` (default: this package's source)."""
    start = Path(start or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=start,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or CUDA broken: metadata must never fail a run
        info["cuda_devices"] = []
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        if key in os.environ:
            info[key.lower()] = os.environ[key]
    return info


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class RunInfo:
    """Collects a stage's metadata and keeps `<output_dir>/run.json` current."""

    def __init__(self, output_dir: str | os.PathLike, stage: str, configs: tuple, seed: int | None):
        self.path = Path(output_dir) / RUN_FILE
        self.data: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "seed": seed,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "command": [Path(sys.argv[0]).name, *redact_argv(sys.argv[1:])],
            "config": config_dict(*configs),
            "git": git_state(),
            "packages": package_versions(),
            "host": host_info(),
            "start": _now(),
            "end": None,
            "metrics": {},
        }
        self.write()

    def write(self) -> None:
        if is_main_process():
            atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")

    def finish(self, metrics: dict[str, Any] | None = None, status: str = "completed") -> None:
        self.data["metrics"].update(_jsonable(metrics or {}))
        self.data["status"] = status
        self.data["end"] = _now()
        self.write()


def read_run_info(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class _RedactingFormatter(logging.Formatter):
    """Log lines (run.log and the console) with credentials replaced (`pipeline.redaction.redact_text`)."""

    def format(self, record: logging.LogRecord) -> str:
        from pipeline.redaction import redact_text

        return redact_text(super().format(record))


def close_logging() -> None:
    """Detach the handlers `setup_logging` added: a stage's run.log receives nothing after it ends."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pipeline", False):
            root.removeHandler(handler)
            handler.close()


def setup_logging(output_dir: str | os.PathLike, level: int = logging.INFO) -> Path:
    """Log to stderr and to `<output_dir>/run.log`; transformers/TRL records go to the same places."""
    import transformers

    log_path = Path(output_dir) / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    close_logging()  # a previous in-process run (tests, sweeps) must not keep writing into its own log file
    file_handler = logging.FileHandler(log_path)
    stream_handler = logging.StreamHandler(sys.stderr)
    # trainer metrics already reach the console through the progress bar; keep them in the file only
    stream_handler.addFilter(lambda record: not record.name.endswith(".metrics"))
    for handler in (file_handler, stream_handler):
        handler.setFormatter(fmt)
        handler._pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity(logging.WARNING if is_main_process() else logging.ERROR)
    return log_path


def _wandb_login_saved() -> bool:
    """Whether `wandb login` saved a key for the W&B host (in ~/.netrc, or $NETRC): only whether the entry
    exists is used; the key is not kept, logged or passed on (wandb reads it itself)."""
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def setup_tracking(report_to: Any, output_dir: str | os.PathLike) -> None:
    """Make W&B safe by default: offline (into the output dir) unless WANDB_API_KEY is set.

    The key is read by wandb itself from the environment; we never read, store or log it.
    """
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if not any(t in ("wandb", "all") for t in targets):
        return
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or _wandb_login_saved()
    if not logged_in and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
        logger.info(
            "W&B: no WANDB_API_KEY in the environment and no `wandb login`, logging offline "
            "(sync later with `wandb sync`)"
        )
    # runs go into their own output dir unless the user chose WANDB_DIR before the process started
    if "WANDB_DIR" not in os.environ or os.environ.get("_PIPELINE_WANDB_DIR") == os.environ["WANDB_DIR"]:
        os.environ["WANDB_DIR"] = os.environ["_PIPELINE_WANDB_DIR"] = str(Path(output_dir).resolve())
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)


def metrics_logging_callback(log: logging.Logger):
    """A `TrainerCallback` that copies the trainer's logged metrics into our log file."""
    from transformers import TrainerCallback

    class MetricsToLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                shown = ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                )
                log.info("step %d: %s", state.global_step, shown)

    return MetricsToLog()
