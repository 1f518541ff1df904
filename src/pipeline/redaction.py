"""One redaction for every place a setting is written: argv, configs, run records, logs, trackers.

A value is a secret when its field is named like one, at any depth (`hub_token`, `model_init_kwargs.token`,
`api_key`, `password`, `client_secret`; not the tokenizer's `pad_token`/`eos_token`, nor `reward_output_key`
or `max_new_tokens`), and credentials inside URLs (`https://user:pass@host`, `?api_key=...`) are secrets
wherever they appear. Secrets are replaced by `REDACTED`; keys are read from the environment and never
passed on the command line by the pipeline itself.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|api_?key|access_?key|secret_?key|private_?key|auth|authorization"
    r"|credentials?)$|^key$",
    re.IGNORECASE,
)
# special tokens of a tokenizer are text, not credentials
_TOKENIZER_TOKEN = re.compile(
    r"(?:^|_)(?:pad|eos|bos|unk|sep|cls|mask|start|end|additional_special|special|im_start|im_end)_token$",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@")
_URL_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:[\w-]*?(?:token|key|secret|password|signature|sig)))=[^&\s#\"']+", re.IGNORECASE
)
_FLAG = re.compile(r"^--(?P<name>[\w.-]+)(?:=(?P<value>.*))?$")
# inside free text (log lines): `--hub_token X`, `'hub_token': 'X'`, `hub_token=X`
_TEXT_FLAG = re.compile(r"(?P<head>--(?P<name>[\w.-]+)[= ])(?P<value>[^\s'\",]+)")
_TEXT_ITEM = re.compile(
    r"(?P<head>(?P<q>['\"])(?P<name>[\w.-]+)(?P=q)\s*:\s*)(?P<vq>['\"])(?P<value>[^'\"]*)(?P=vq)"
)
_TEXT_ASSIGN = re.compile(r"(?P<head>\b(?P<name>[\w.]+)=)(?P<value>[^\s'\",&)]+)")


def is_secret_name(name: Any) -> bool:
    text = str(name)
    return bool(_SECRET_NAME.search(text)) and not _TOKENIZER_TOKEN.search(text)


def _hide_named(match: re.Match) -> str:
    if not is_secret_name(match.group("name").rsplit(".", 1)[-1]):
        return match.group(0)
    quote = match.groupdict().get("vq") or ""
    return f"{match.group('head')}{quote}{REDACTED}{quote}"


def redact_text(text: str) -> str:
    """A string (a log line, an argument) with URL credentials and the values of secret-named flags, items
    and assignments replaced."""
    if "://" not in text and "=" not in text and "--" not in text and ":" not in text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _URL_QUERY_SECRET.sub(lambda m: f"{m.group('name')}={REDACTED}", text)
    for pattern in (_TEXT_FLAG, _TEXT_ITEM, _TEXT_ASSIGN):
        text = pattern.sub(_hide_named, text)
    return text


def redact(value: Any, name: Any = None) -> Any:
    """`value` (a mapping, list or scalar) with every secret replaced; `name` is the field it sits in."""
    if name is not None and is_secret_name(name) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with the value of every secret-named flag (`--hub_token X`, `--hub_token=X`)
    and every URL credential replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        match = _FLAG.match(arg)
        if match and is_secret_name(match.group("name")):
            if match.group("value") is None:
                hide_next = True
                out.append(arg)
            else:
                out.append(f"--{match.group('name')}={REDACTED}")
            continue
        out.append(redact_text(arg))
    return out
