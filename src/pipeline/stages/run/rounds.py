"""Rounds: a block of stages repeated K times, each round starting from the previous round's policy.

    stages:
      - name: sft ...
      - rounds: 2                        # K (a number or a `${var}`)
        policy: "${sft.output_dir}"      # the policy round 1 starts from
        next_policy: ips                 # the block stage whose output is the next round's start policy
        reference: round                 # round (default): each round's start policy; first: round 1's
        stages:
          - {name: collect, stage: collect, args: {model_name_or_path: "${round.policy}", seed: "${round.index}"}}
          - {name: prepare, stage: prepare, args: {data_path: "${collect.output_dir}/samples.parquet"}}
          - {name: logp, stage: logp, args: {model_name_or_path: "${round.reference}", ...}}
          - {name: ips, stage: ips, args: {model_name_or_path: "${round.policy}", ...}}
      - name: eval
        args: {models: ["${sft.output_dir}", "${rounds.policies}"], model_names: [sft, "${rounds.names}"]}

The block is unrolled when the file is read: round k's stages are named `round_<k>-<name>` and write to
`<run dir>/round_<k>/<name>/`; inside the block `${collect.output_dir}` means this round's collect,
`${round.policy}` the round's start policy, `${round.reference}` its reference model (see `reference`),
`${round.index}` k. After the block, `${rounds.policies}` and `${rounds.names}` in a list are spliced in as
every round's policy folder and name (`round_1`, `round_2`, ...), `${rounds.last}` is the last policy.
Each unrolled stage is skipped, resumed or rerun like any other (a change in round 1 reruns round 2).

`reference: round` (the default) scores each round's data against the policy that sampled it: the
importance weights of IPS then correct for exactly the round's own drift, and the KL term keeps each round
near its start. `reference: first` anchors every round to round 1's start (the SFT model): a KL to a fixed
point, at the price of weights that grow as the rounds move away from it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.stages.run.placeholders import REFERENCE

ROUND_KEYS = {"rounds", "policy", "next_policy", "reference", "stages"}
REFERENCES = ("round", "first")


def round_count(value: Any, variables: dict[str, Any], where: str) -> int:
    if isinstance(value, str):
        match = REFERENCE.fullmatch(value.strip())
        if match and match.group(2) is None and match.group(1) in variables:
            value = variables[match.group(1)]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipelineError(f"{where}: `rounds` must be a whole number >= 1 (or a `${{var}}` holding one), "
                            f"got {value!r}")  # fmt: skip
    return value


def _rewrite(value: Any, rename: dict[str, str], round_refs: dict[str, str]) -> Any:
    """`${name.field}` of a block stage -> this round's stage; `${round.x}` -> this round's value."""
    if isinstance(value, dict):
        return {k: _rewrite(v, rename, round_refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, rename, round_refs) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, key = match.group(1), match.group(2)
        if name == "round":
            if key not in round_refs:
                raise KeyError(key)
            return round_refs[key]
        if name in rename:
            return "${" + rename[name] + (f".{key}" if key else "") + "}"
        return match.group(0)

    whole = REFERENCE.fullmatch(value)
    if whole and whole.group(1) == "round" and whole.group(2) == "index":
        return int(round_refs["index"])  # a number stays a number
    return REFERENCE.sub(one, value)


def unroll(entry: dict, variables: dict[str, Any], where: str, read_stage) -> tuple[list, dict[str, Any]]:
    """The block's stages for every round (StageSpecs, via `read_stage(entry, where)`), and what
    `${rounds.*}` means to the stages after it."""
    unknown = set(entry) - ROUND_KEYS
    if unknown:
        raise PipelineError(f"{where}: unknown key '{sorted(unknown)[0]}' in a rounds block "
                            f"(use {', '.join(sorted(ROUND_KEYS))})")  # fmt: skip
    count = round_count(entry["rounds"], variables, where)
    block = entry.get("stages") or []
    if not isinstance(block, list) or not block:
        raise PipelineError(f"{where}: a rounds block needs `stages:`, the stages each round runs")
    if not entry.get("policy"):
        raise PipelineError(f"{where}: a rounds block needs `policy:`, the model round 1 starts from")
    names = [str(s.get("name") or s.get("stage")) for s in block if isinstance(s, dict)]
    next_policy = entry.get("next_policy")
    if next_policy not in names:
        raise PipelineError(f"{where}: `next_policy` must name one of the block's stages ({', '.join(names)}), "
                            f"got {next_policy!r}")  # fmt: skip
    reference = entry.get("reference", "round")
    if reference not in REFERENCES:
        raise PipelineError(f"{where}: `reference` must be one of {', '.join(REFERENCES)}, got {reference!r}")
    first = str(entry["policy"])
    specs = []
    for k in range(1, count + 1):
        rename = {n: f"round_{k}-{n}" for n in names}
        start = first if k == 1 else "${" + f"round_{k - 1}-{next_policy}.output_dir" + "}"
        round_refs = {"policy": start, "reference": start if reference == "round" else first, "index": str(k)}
        for i, stage in enumerate(block):
            spot = f"{where}.stages[{i}] (round {k})"
            if not isinstance(stage, dict):
                raise PipelineError(f"{spot}: each stage is a mapping with at least `stage:`")
            try:
                args = _rewrite(dict(stage.get("args") or {}), rename, round_refs)
            except KeyError as err:
                raise PipelineError(f"{spot}: ${{round.{err.args[0]}}}: use round.policy, round.reference or "
                                    "round.index") from None  # fmt: skip
            after = [rename.get(a, a) for a in stage.get("after") or []]
            name = str(stage.get("name") or stage.get("stage"))
            spec = read_stage({**stage, "name": rename[name], "args": args, "after": after}, spot)
            spec.folder = str(Path(f"round_{k}") / name)
            specs.append(spec)
    policies = ["${" + f"round_{k}-{next_policy}.output_dir" + "}" for k in range(1, count + 1)]
    after_block = {"policies": policies, "names": [f"round_{k}" for k in range(1, count + 1)],
                   "last": policies[-1], "count": count}  # fmt: skip
    return specs, after_block


def splice_rounds(value: Any, after_block: dict[str, Any] | None) -> Any:
    """`${rounds.policies}` / `${rounds.names}` as list items become every round's; `${rounds.last}` and
    `${rounds.count}` their value."""
    if isinstance(value, list):
        out = []
        for item in value:
            spliced = splice_rounds(item, after_block)
            out.extend(spliced if isinstance(spliced, list) and not isinstance(item, list) else [spliced])
        return out
    if not isinstance(value, str) or "${rounds." not in value:
        return value
    if after_block is None:
        raise PipelineError(f"'{value}': `${{rounds.*}}` is only known after a rounds block")

    def one(match: re.Match) -> str:
        if match.group(1) != "rounds":
            return match.group(0)
        key = match.group(2)
        if key not in after_block:
            raise PipelineError(f"'{value}': ${{rounds.{key}}}: use rounds.policies, rounds.names, rounds.last "
                                "or rounds.count")  # fmt: skip
        if isinstance(after_block[key], list):
            raise PipelineError(f"'{value}': ${{rounds.{key}}} is a list: use it alone as an item of a list")
        return str(after_block[key])

    whole = REFERENCE.fullmatch(value)
    if whole and whole.group(1) == "rounds" and isinstance(after_block.get(whole.group(2)), list):
        return list(after_block[whole.group(2)])
    return REFERENCE.sub(one, value)
