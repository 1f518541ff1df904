"""Which folders the pipeline may write into, replace or delete (and which it never touches).

A stage writes only into a folder that is absent, empty, or its own earlier output: the first thing it
writes there is `OWNER_FILE` naming the stage. Anything else is refused in one line, before any file is
written. Replacing a folder (`overwrite: true`, `pipeline run` after a config change, `tiny-model`,
`subset`) needs that marker too, and is never done to the filesystem root, the home folder, the working
directory or a folder above it, the project checkout, or a folder holding one of the stage's inputs. A
replacement is built in a temporary sibling; the old folder is renamed aside, the new one renamed in,
then the old one deleted, so a crash leaves one of the two whole.

Folders written before the marker existed count as a stage's own when their `run.json` or
`manifest.json` names that stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import PipelineError

OWNER_FILE = ".pipeline_output.json"
_CHECKOUT = Path(__file__).resolve().parents[2]  # the source checkout when installed editable


def _is_checkout(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "src" / "pipeline").is_dir()


def check_name(value, what: str) -> str:
    """A name that becomes one path component (a stage name, a sweep value, a tag): one clear line when it
    would name another folder (separators, `.`, `..`) or is empty."""
    text = str(value)
    if not text or text in (".", "..") or any(c in text for c in ("/", "\\", "\0")):
        raise PipelineError(f"{what} {text!r} becomes part of a path: use a name without '/', '\\', and not "
                            "'.' or '..'")  # fmt: skip
    return text


def owner(folder: str | os.PathLike) -> str | None:
    """The stage whose output `folder` is (its marker, or an older run.json/manifest.json), or None."""
    folder = Path(folder)
    for name in (OWNER_FILE, "run.json", "manifest.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("stage"), str):
            return data["stage"]
    if (folder / "job.json").is_file():  # an older logp store
        return "logp"
    if (folder / ".pipeline").is_dir() or (
        folder / "pipeline_run.json"
    ).is_file():  # an older `pipeline run` root
        return "run"
    return None


def _entries(folder: Path) -> list[str]:
    """The folder's entries, less the marker (and its temporary names while another rank writes it)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(OWNER_FILE))


def _write_marker(folder: Path, stage: str) -> None:
    from pipeline import __version__

    tmp = folder / f"{OWNER_FILE}.tmp-{os.getpid()}"
    # no timestamp: the same stage with the same arguments writes byte-identical folders (tiny-model's promise)
    tmp.write_text(json.dumps({"stage": stage, "pipeline": __version__}) + "\n")
    os.replace(tmp, folder / OWNER_FILE)


def _not_ours(folder: Path, stage: str, key: str) -> PipelineError | None:
    """Why `folder` is not `stage`'s to write into (None when it is absent, empty or ours)."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return PipelineError(f"{key} '{folder}' is a file, not a folder; choose a folder name")
    entries = _entries(folder)
    if not entries:
        return None
    found = owner(folder)
    if found == stage:
        return None
    if found:
        return PipelineError(
            f"{key} '{folder}' holds the output of `pipeline {found}`, not of `pipeline {stage}`; nothing was "
            "changed: choose another folder"
        )
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return PipelineError(
        f"{key} '{folder}' holds files the pipeline did not write ({shown}); nothing was changed: choose a "
        "new or empty folder"
    )


def check_ours(folder: str | os.PathLike, stage: str, key: str = "output_dir") -> None:
    """Refuse (one line) unless `folder` is absent, empty or `stage`'s own output; writes nothing."""
    error = _not_ours(Path(folder), stage, key)
    if error:
        raise error


def claim(folder: str | os.PathLike, stage: str, key: str = "output_dir") -> Path:
    """Make `folder` `stage`'s output folder (created and marked when absent or empty), or refuse in one
    line. Every process may call it: the marker is written before anything else, under a temporary name."""
    folder = Path(folder)
    error = _not_ours(folder, stage, key)
    if error:
        raise error
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / OWNER_FILE).is_file():
        _write_marker(folder, stage)
    return folder


def _protected(folder: Path, inputs: Iterable[str | os.PathLike]) -> str | None:
    """Why `folder` may never be replaced or deleted (None when it may)."""
    here = folder.resolve()
    if here == Path(here.anchor):
        return "the filesystem root"
    if here == Path.home().resolve() or here in Path.home().resolve().parents:
        return "the home folder"
    cwd = Path.cwd().resolve()
    if here == cwd or here in cwd.parents:
        return "the working directory"
    if _is_checkout(here) or (_is_checkout(_CHECKOUT) and (here == _CHECKOUT or here in _CHECKOUT.parents)):
        return "the project checkout"
    for item in inputs:
        if item and os.path.exists(item):
            path = Path(item).resolve()
            if path == here or here in path.parents:
                return f"this stage's input '{item}'"
    return None


def check_replaceable(
    folder: str | os.PathLike, stage: str, inputs: Iterable = (), key: str = "output_dir"
) -> None:
    """Refuse (one line) to replace or delete `folder` unless it is empty or `stage`'s own output, and not
    one of the places the pipeline never deletes."""
    folder = Path(folder)
    if not folder.exists():
        return
    reason = _protected(folder, inputs)
    if reason:
        raise PipelineError(f"{key} '{folder}' is {reason} (or holds it): the pipeline never replaces it; "
                            "choose another folder")  # fmt: skip
    error = _not_ours(folder, stage, key)
    if error:
        raise error


def _aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.time_ns()}")


def set_aside(
    folder: str | os.PathLike, stage: str, inputs: Iterable = (), key: str = "output_dir"
) -> Path | None:
    """Rename `stage`'s own output folder to a hidden sibling (checked as `check_replaceable`), to delete
    with `drop_set_aside` once its replacement is complete; None when it was absent."""
    folder = Path(folder)
    check_replaceable(folder, stage, inputs, key)
    if not folder.exists():
        return None
    aside = _aside(folder)
    os.replace(folder, aside)
    return aside


def drop_set_aside(folder: str | os.PathLike, stage: str) -> list[str]:
    """Delete the folders `set_aside` made for `folder` (only those marked as `stage`'s); their names."""
    folder = Path(folder)
    dropped = []
    for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if old.is_dir() and owner(old) == stage:
            shutil.rmtree(old, ignore_errors=True)
            dropped.append(old.name)
    return dropped


@contextlib.contextmanager
def replacing(
    folder: str | os.PathLike, stage: str, inputs: Iterable = (), key: str = "output_dir"
) -> Iterator[Path]:
    """Yield an empty, marked temporary sibling of `folder` to fill. On success it becomes `folder` (the old
    one, checked as `check_replaceable` before anything is built, renamed aside, then deleted); on error it
    is removed and `folder` is untouched."""
    folder = Path(folder)
    inputs = list(inputs)
    check_replaceable(folder, stage, inputs, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_marker(tmp, stage)
        yield tmp
        check_replaceable(folder, stage, inputs, key)  # what was there may have changed meanwhile
        aside = None
        if folder.exists():
            aside = _aside(folder)
            os.replace(folder, aside)
        os.replace(tmp, folder)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
