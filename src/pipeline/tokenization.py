"""Prompt + response → token ids: the one tokenization every stage that scores responses goes through.

`prepare` (length filter), `logp` (reference log-probs) and `ips` (training) must agree token for token, or
stored log-probs silently misalign with the tokens being trained. So they all call `tokenize_prompt_response`
and record `tokenizer_fingerprint` next to their outputs.

Conventions:
- the prompt is a chat: one user message, optionally followed by one assistant message holding a prefix the
  response was forced to start with. The prompt is rendered with the chat template and a generation prompt;
  the prefix is appended as plain text, so it conditions the response but is not scored;
- the response is tokenized on its own (no special tokens), followed by the eos token;
- truncation keeps the whole prompt and cuts the response to fit `max_length` in total.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


class PromptError(ValueError):
    """A prompt value that is not a usable chat; the message says what is wrong."""


def parse_prompt(value: Any) -> list[dict[str, str]]:
    """`prompt_pretokenized` (JSON text of a message list, a message list, or plain text) → messages.

    Plain text that is not a JSON list is taken as one user message.
    """
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise PromptError(f"invalid JSON ({err.msg} at char {err.pos})") from None
            except RecursionError:
                raise PromptError("JSON nested too deeply (a chat prompt is a list of messages)") from None
        else:
            return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PromptError("must be a non-empty list of {role, content} messages")
    if len(value) > 2:
        raise PromptError(
            f"has {len(value)} messages; expected a user message and an optional assistant prefix"
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise PromptError(f"message {i} is not a mapping")
        if not isinstance(message.get("content"), str):
            raise PromptError(f"message {i} has no string 'content'")
        if message.get("role") not in ("user", "assistant", "system"):
            raise PromptError(f"message {i} has role {message.get('role')!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[0]["role"] != "user":
        raise PromptError(f"first message has role '{messages[0]['role']}', expected 'user'")
    if len(messages) == 2 and messages[1]["role"] != "assistant":
        raise PromptError("second message must be the assistant prefix (role 'assistant')")
    return messages


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text the model sees before the response: chat template + generation prompt + assistant prefix."""
    text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    if len(messages) == 2:
        text += messages[1]["content"]
    return text


@dataclass
class TokenizedSample:
    input_ids: list[int]
    prompt_len: int  # response tokens are input_ids[prompt_len:]
    truncated: bool

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def tokenize_prompt_response(
    tokenizer,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    max_length: int | None = None,
    add_eos: bool = True,
) -> list[TokenizedSample]:
    """Tokenize a batch of (prompt messages, response text) pairs; see the module docstring for the rules.

    A sample whose prompt alone fills `max_length` keeps no response token (response_len == 0).
    """
    prompt_ids = tokenizer([render_prompt(tokenizer, m) for m in prompts], add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    samples = []
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        r_ids = r_ids + eos
        truncated = False
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            r_ids = r_ids[: max(0, max_length - len(p_ids))]
            truncated = True
        samples.append(TokenizedSample(p_ids + r_ids, len(p_ids), truncated))
    return samples


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocabulary/merges, special tokens and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab()).encode()
    )
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


def reward_model_input_ids(tokenizer, prompt: list[dict[str, str]] | str, answer: str) -> list[int]:
    """The token ids a reward model scores for (prompt, answer), built as TRL's RewardTrainer built its
    training pairs: a chat prompt plus the answer as the assistant turn through the reward model's own chat
    template (an assistant prefix ending the prompt is continued by the answer), or a text prompt + answer +
    eos. Every stage that asks a reward model for a score (ppo, grpo's judge, eval) goes through here, so a
    reward model with another tokenizer than the policy's is always fed its own tokens."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt + answer + (tokenizer.eos_token or ""))["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("the reward model's tokenizer has no chat template, but the prompts are chats")
    messages = [dict(m) for m in prompt]
    if messages and messages[-1]["role"] == "assistant":
        messages[-1]["content"] += answer
    else:
        messages.append({"role": "assistant", "content": answer})
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
