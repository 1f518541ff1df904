"""A judge behind any OpenAI-compatible chat-completions endpoint, called with the standard library."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from pipeline.errors import PipelineError
from pipeline.judges.base import (
    DEFAULT_JUDGE_TEMPLATE,
    TEMPLATE_FIELDS,
    Messages,
    PairwiseJudge,
    conversation_text,
    verdict_of,
)

logger = logging.getLogger("pipeline.judges")


MAX_REPLY_BYTES = 1 << 20  # a chat completion of a few tokens is far smaller


MAX_RETRY_WAIT = 300.0  # seconds: the longest wait a Retry-After header can ask for


class _Retryable(Exception):
    """A failure worth another try (network, timeout, 429, 5xx); `retry_after`: seconds the server asked."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number, or an HTTP date), capped; None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_WAIT)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is not followed (the request, and its key, stay with the configured origin): urllib then
    raises the 3xx as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class VerdictCache:
    """Verdicts appended to a JSON-lines file as they arrive (a killed run keeps every finished one)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.verdicts: dict[str, float | None] = {}
        self._lock = threading.Lock()
        try:
            with open(self.path) as fh:
                for line in fh:
                    try:
                        item = json.loads(line)
                        self.verdicts[item["key"]] = item["verdict"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut off by a kill
        except FileNotFoundError:
            pass

    def add(self, key: str, verdict: float | None) -> None:
        with self._lock:
            self.verdicts[key] = verdict
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"key": key, "verdict": verdict}) + "\n")


class OpenAIJudge(PairwiseJudge):
    """A judge behind an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    ``base_url`` is what OpenAI clients call the base URL, usually ending in ``/v1``
    (``https://api.openai.com/v1``, ``http://localhost:8000/v1`` for vLLM). ``api_key_env`` names the
    environment variable holding the key; unset or empty, no Authorization header is sent (local servers).
    Each request may take ``timeout`` seconds; a failed one is retried ``max_retries`` times, waiting
    ``backoff * 2**attempt`` seconds between tries, so one request gives up after at most
    ``(max_retries + 1) * timeout + backoff * (2**max_retries - 1)`` seconds.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 4,
        max_tokens: int = 16,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        progress: bool = True,
        allow_http_key: bool = False,
        cache_path: str | os.PathLike | None = None,
    ):
        parsed = urllib.parse.urlparse(base_url or "")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise PipelineError(
                f"judge_base_url: '{base_url}' is not an http(s) URL (e.g. http://localhost:8000/v1)"
            )
        if not model:
            raise PipelineError(
                "judge_model is required with judge: openai (the model name the endpoint serves)"
            )
        missing = [f for f in TEMPLATE_FIELDS if f not in template]
        if missing:
            raise PipelineError(f"judge_template: missing the placeholder {missing[0]}")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or concurrency < 1:
            raise PipelineError(
                "judge_timeout must be > 0, judge_max_retries >= 0, judge_backoff >= 0, judge_concurrency >= 1"
            )
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self.max_tokens = int(max_tokens)
        self.template = template
        self.progress = progress
        self.allow_http_key = allow_http_key
        self.cache = VerdictCache(cache_path) if cache_path else None
        self.cached = 0  # verdicts taken from the cache
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.requests = 0  # HTTP requests sent, retries included
        self.invalid = 0  # chat completions without a verdict
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- plumbing

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key and (self.url.startswith("https://") or self.allow_http_key or _is_loopback(self.url)):
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def use_cache(self, path: str | os.PathLike) -> None:
        """Keep every verdict in `path` (JSON lines), and take those already there instead of asking."""
        self.cache = VerdictCache(path)

    def check_reachable(self) -> None:
        """Open (and close) a TCP connection to the endpoint's host: an unreachable judge is reported before
        hours of generation, at no API cost."""
        parsed = urllib.parse.urlparse(self.base_url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=self.timeout):
                pass
        except OSError as err:
            raise PipelineError(
                f"judge_base_url: cannot connect to {parsed.hostname}:{port} ({_reason(err)}); "
                "start the server or fix the URL"
            ) from None

    def _post_once(self, payload: bytes) -> dict:
        request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method="POST")
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self.requests += 1
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                chunks, size = [], 0
                while True:  # the socket timeout bounds each read; the deadline bounds a trickling body
                    chunk = response.read(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_REPLY_BYTES:
                        raise PipelineError(f"judge endpoint {self.url}: the reply is larger than "
                                            f"{MAX_REPLY_BYTES >> 20} MiB; check judge_base_url")  # fmt: skip
                    if time.monotonic() > deadline:
                        raise _Retryable(f"timed out after {self.timeout:g} s")
                body = b"".join(chunks)
        except urllib.error.HTTPError as err:
            status = err.code
            detail = _snippet(err.read(4096) if err.fp is not None else b"")
            if 300 <= status < 400:
                raise PipelineError(f"judge endpoint {self.url}: redirected (HTTP {status}) to "
                                    f"{err.headers.get('Location')!r}, which is not followed (the key stays with "
                                    "the configured origin); set judge_base_url to the final address") from None  # fmt: skip
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}", _retry_after(err.headers.get("Retry-After"))) from None
            hint = ""
            if status in (401, 403):
                hint = (
                    f"; check the key in the environment variable {self.api_key_env}"
                    if self.api_key_env
                    else "; set judge_api_key_env to the name of the variable holding the key"
                )
                if self.url.startswith("http://") and not (self.allow_http_key or _is_loopback(self.url)):
                    hint += " (the key is not sent over http unless judge_allow_http_key is true)"
            elif status == 404:
                hint = "; judge_base_url should end where /chat/completions starts (often .../v1)"
            raise PipelineError(f"judge endpoint {self.url}: HTTP {status} {detail}{hint}") from None
        except TimeoutError:
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as err:
            raise _Retryable(_reason(err.reason)) from None
        except (http.client.HTTPException, ConnectionError, OSError) as err:
            raise _Retryable(_reason(err)) from None
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise PipelineError(
                f"judge endpoint {self.url}: the reply is not an OpenAI chat completion ({_snippet(body)}); "
                "check judge_base_url"
            )
        return data

    def post(self, payload: dict) -> dict:
        """POST a chat-completions request, retrying what is worth retrying; a `PipelineError` in the end
        (after which the requests still queued give up without being sent)."""
        try:
            return self._post_with_retries(payload)
        except PipelineError:
            self._stop.set()
            raise

    def _post_with_retries(self, payload: dict) -> dict:
        encoded = json.dumps(payload).encode()
        reason, wait = "", 0.0
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise PipelineError("judge: stopped after an earlier request failed")
            if attempt:
                # jitter spreads the retries of concurrent requests; Retry-After is a floor
                time.sleep(max(wait, self.backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
            try:
                return self._post_once(encoded)
            except _Retryable as err:
                reason, wait = str(err), err.retry_after or 0.0
                logger.warning(
                    "judge endpoint %s: try %d of %d failed: %s",
                    self.url,
                    attempt + 1,
                    self.max_retries + 1,
                    reason,
                )
        raise PipelineError(
            f"judge endpoint {self.url}: no answer after {self.max_retries + 1} tries ({reason}); "
            "check that the server is up, or raise judge_timeout / judge_max_retries"
        )

    def ask(self, prompt: Messages, first: str, second: str) -> float | None:
        text = (
            self.template.replace("{prompt}", conversation_text(prompt))
            .replace("{answer_a}", first)
            .replace("{answer_b}", second)
        )
        key = hashlib.sha256(
            json.dumps([self.base_url, self.model, self.max_tokens, text]).encode()
        ).hexdigest()
        if self.cache is not None and key in self.cache.verdicts:
            with self._lock:
                self.cached += 1
            return self.cache.verdicts[key]
        verdict = self._ask(text)
        if self.cache is not None:
            self.cache.add(key, verdict)
        return verdict

    def _ask(self, text: str) -> float | None:
        data = self.post(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        )
        choice = data["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        verdict = verdict_of(content)
        if verdict is None:
            with self._lock:
                self.invalid += 1
            logger.debug("judge: no verdict in %r", _snippet(str(content).encode()))
        return verdict

    def judge(self, prompts, first, second):
        from tqdm.auto import tqdm

        n = len(prompts)
        out: list[float | None] = [None] * n
        if not n:
            return out
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="judge")
        try:
            futures = {pool.submit(self.ask, prompts[i], first[i], second[i]): i for i in range(n)}
            with tqdm(total=n, desc="judging", disable=not self.progress, unit="req") as bar:
                for future in as_completed(futures):
                    out[futures[future]] = future.result()
                    bar.update()
        except BaseException:
            self._stop.set()  # queued requests give up at once; running ones end within their timeout
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out


def _is_loopback(url: str) -> bool:
    """A URL on this machine (localhost, 127.0.0.0/8, ::1): plain http never leaves it."""
    import ipaddress

    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(err: Any) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def _snippet(body: bytes, limit: int = 80) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))
