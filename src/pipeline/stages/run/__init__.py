"""`pipeline run`: chain stages into one resumable pipeline, and sweep it over seeds, dataset sizes, anything.

    pipeline run recipes/demo/pipeline.yaml [--dry_run] [--from STAGE] [--index I | --jobs N] [--list]

A pipeline file (YAML):

    output_dir: runs/dpo_sizes             # the root; each sweep point gets its own run directory under it
    sweep:                                 # optional: the cartesian product of these lists
      train_size: [1000, 2000, 4000]
      seed: [0, 1, 2]
    args: {seed: "${seed}"}                # optional: arguments every stage gets (its own win)
    stages:
      - name: sft                          # unique; the stage's output_dir defaults to <run dir>/<name>
        stage: sft                         # any `pipeline` stage
        recipe: recipes/demo/sft.yaml      # optional: the stage's YAML recipe ...
        args: {max_steps: 100}             # ... and/or fields that override it
        shared: true                       # run once for all sweep points (in <root>/shared/<name>)
      - name: dpo
        stage: dpo
        recipe: recipes/demo/dpo.yaml
        args: {model_name_or_path: "${sft.output_dir}", max_train_samples: "${train_size}"}
        launch: {config_file: accelerate_configs/deepspeed_zero2.yaml, num_processes: 8}   # optional
        after: [sft]                       # optional: runs after (and reruns with) stages it does not reference

`${name.field}` is that stage's resolved argument (a stage's output becomes the next one's input);
`${field}` is a sweep value or one of the file's `vars:` (which `--set VAR=VALUE` overrides), `${run_dir}`
the point's directory, `${root}` the pipeline's output_dir. The argument `_` holds positional arguments.

**Rounds.** An entry `{rounds: K, policy: ..., next_policy: STAGE, reference: round|first, stages: [...]}`
repeats its stages K times, each round starting from the previous round's `next_policy` output (expert
iteration: collect -> prepare -> logp -> ips, or collect -> prepare -> dpo). Round k's stages are named
`round_<k>-<name>` and write under `<run dir>/round_<k>/`; inside the block `${round.policy}`,
`${round.reference}` and `${round.index}` are the round's start policy, reference model and number, and
after it `${rounds.policies}` / `${rounds.names}` list every round's policy folder and name (see
`pipeline.stages.run.rounds`, which also explains the `reference` default).

**Several nodes.** Every node runs the same `pipeline run` with its `NODE_RANK` (0 on the first). `launch:`
values are substituted on each node, `${env.NAME}` being that node's environment variable (e.g.
`machine_rank: "${env.NODE_RANK}"`); launched stages run on every node, the others on node 0 alone while
the rest wait for their markers (`PIPELINE_NODE_WAIT_S`, default a day). The output folder must be on a
filesystem every node sees. A Slurm example: docs/slurm.md.

**Skip / rerun.** A stage's fingerprint hashes its stage name, resolved arguments, its recipe file's
*content*, and the fingerprints of the stages it references. After a stage completes, the runner records
the fingerprint in `<run dir>/.pipeline/<name>.json`. A stage whose recorded fingerprint matches and whose
output (run.json completed, or manifest.json, or any files) is present is skipped; a changed config gives a
new fingerprint, so that stage and every stage that references it (directly or not) rerun, with their old
output removed first. A stage that failed or was killed reruns into the same output_dir, so stages that
resume from checkpoints (ppo, the TRL trainers with `resume_from_checkpoint`) pick up where they were.
`--from STAGE` reruns that stage and every later one; `--dry_run` prints the plan (and each command)
without running anything.

**Sweeps.** Every point is an independent run directory (`<root>/train_size=1000,seed=0/`) with each
stage's own `run.json`. `--list` prints the points with their index; `--index I` runs one point (a cluster
array job per point; shared stages are guarded by a file lock); `--jobs N` runs N points side by side as
subprocesses, one GPU each when GPUs are visible (`CUDA_VISIBLE_DEVICES`). Stages run in this process
(no import cost per stage) unless they have `launch:`, which runs `accelerate launch --config_file ... -m
pipeline.cli <stage> ...` in a subprocess. `pipeline_run.json` (in the root; in the point's folder with
`--index`) records what ran, what was skipped and how long each stage took.

Code: spec (the pipeline file), rounds (unrolling a rounds block), plan (resolve, fingerprint, run or skip),
execute; `main` in stage.py.
"""

from pipeline.stages.run.spec import load_pipeline
from pipeline.stages.run.stage import main

__all__ = ["load_pipeline", "main"]
