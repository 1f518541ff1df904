#!/usr/bin/env bash
# Offline IPS training from a prepared dataset and its reference logps (made by scripts/run_logp.sh).
#
#   scripts/train.sh DATAPATH MODELPATH TAG REWARDKEY RSPKEY DATAFILTER [extra pipeline ips flags]
#
# DATAPATH: a `pipeline prepare` output, or the raw logged parquet (a file, glob or folder) as run_logp.sh
# took it: that is prepared (or reused) into STEM_prepared with REWARDKEY and RSPKEY naming its columns, and
# training reads prepare's `reward` column. The logps are read from PREPARED_TAG_logp (run_logp.sh's naming).
# REWARDKEY: with a prepared DATAPATH, the rl view's column to train on (`reward` = after prepare's
# transforms, or the raw column's name); with raw data, the raw reward column (the old scripts' meaning).
# RSPKEY: response column (must be the one the logps scored). DATAFILTER: none | posonly | negonly.
# Knobs (environment): bsz (per device, 4), gacc (gradient accumulation, 8), lr (in 1e-6: lr=10 is 1e-5;
# default 1), gpu (processes per node), kl (0.5), ml (max tokens, 2000), proj (W&B project; unset: no W&B),
# numepoch (3), savemin (a checkpoint about every this many minutes, 30; the run resumes from the last one),
# out (output folder; default DATAPATH_TAG_ips_REWARDKEY_DATAFILTER_lrLR_klKL_bsBSZxGACC_mlML_epN,
# so runs with other knobs never resume each other), dryrun=1 (print the command); multi-node: WORKER_NUM, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, NUM_GPUS (see scripts/_launch.sh).
# ds: the distributed setup by name (default zero2) — zero2 | zero3 | zero3_offload | fsdp2 | ddp |
# single_gpu | multi_node, or a path to a DeepSpeed .json / accelerate .yaml. Each name is a file pair in
# accelerate_configs/ and deepspeed_configs/ (table in scripts/_launch.sh). Before a long run:
#   pipeline check --config RECIPE.yaml --stage ips --zero 2 --num_gpus 8     # memory per GPU, micro-batch
# With no GPU it runs one CPU process without DeepSpeed, so the same command makes a small trial.
#   ds=zero3 gpu=8 scripts/train.sh data/prepared MODEL ref reward unprocessed_response posonly
#   WORKER_NUM=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 ds=zero3 scripts/train.sh ...   # each node
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 DATAPATH MODELPATH TAG REWARDKEY RSPKEY DATAFILTER [extra pipeline ips flags]" >&2
  exit 2
fi
datapath=${1%/}; modelpath=$2; tag=$3; rewardkey=$4; rspkey=$5; datafilter=$6; shift 6
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/scripts/_launch.sh"
path_name TAG "$tag"; path_name REWARDKEY "$rewardkey"; path_name DATAFILTER "$datafilter"
launch_prefix "${ds:-zero2}"
# a raw logged parquet is prepared (possibly long) only once the knobs above are known to be good
prepared_data "$datapath" "$rewardkey" "$rspkey"
datapath=$PREPARED; trainkey=$rewardkey
if [ "$RAW" = 1 ]; then trainkey=reward; fi
outdir=${out:-${datapath}_${tag}_ips_${rewardkey}_${datafilter}_lr${lr:-1}_kl${kl:-0.5}_bs${bsz:-4}x${gacc:-8}_ml${ml:-2000}_ep${numepoch:-3}}
report=(--report_to none)
# the W&B run is named from the knobs, as the old scripts did (the output folder's name holds them all)
if [ -n "${proj:-}" ]; then export WANDB_PROJECT=$proj; report=(--report_to wandb --run_name "$(basename "$outdir")"); fi
bf16=false; if [ "$ON_CPU" = 0 ]; then bf16=true; fi
run_or_print "${LAUNCH[@]}" -m pipeline.cli ips \
  --data_path "$datapath" --model_name_or_path "$modelpath" --ref_tag "$tag" \
  --logp_dir "${datapath}_${tag}_logp" \
  --output_dir "$outdir" \
  --reward_key "$trainkey" --response_key "$rspkey" --datafilter "$datafilter" \
  --per_device_train_batch_size "${bsz:-4}" --gradient_accumulation_steps "${gacc:-8}" \
  --learning_rate "${lr:-1}e-6" --kl_coef "${kl:-0.5}" --max_length "${ml:-2000}" \
  --num_train_epochs "${numepoch:-3}" --bf16 "$bf16" --gradient_checkpointing false \
  --save_strategy epoch --save_every_minutes "${savemin:-30}" --logging_steps 10 "${report[@]}" "$@"
