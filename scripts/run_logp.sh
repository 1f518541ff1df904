#!/usr/bin/env bash
# Reference log-probs of every response of a `pipeline prepare` output, stored next to it.
#
#   scripts/run_logp.sh DATAPATH MODELPATH TAG        # writes DATAPATH_TAG_logp/
#
# DATAPATH: a `pipeline prepare` output, or the raw logged parquet (a file, glob or folder): that is prepared
# first into STEM_prepared with rkey (reward column, default normalized_reward) and rspkey (response column,
# default unprocessed_response), reused when complete and unchanged, and the logps go to STEM_prepared_TAG_logp.
# Knobs (environment): bsz (rows per device batch, default 8), ml (max prompt+response tokens, default 2000),
# gpu (processes per node), multi-node: WORKER_NUM, NODE_RANK, MASTER_ADDR, MASTER_PORT, NUM_GPUS;
# logpout (output folder, default DATAPATH_TAG_logp; `out` is train.sh's model folder and is not read here); dryrun=1 prints the command. Extra arguments after TAG
# are passed to `pipeline logp` (e.g. --part_rows 2048). Rerunning the same command resumes.
# Scoring is data-parallel: every process holds the whole reference model in bf16 and scores its own parts,
# so ZeRO/FSDP would shard nothing. ds= (see scripts/_launch.sh) is checked and then only ddp (default),
# single_gpu and multi_node's rank flags matter; a sharding name (zero2, zero3, zero3_offload, fsdp2) is
# noted and launched as ddp. Several nodes: WORKER_NUM, NODE_RANK, MASTER_ADDR, MASTER_PORT as in train.sh.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 DATAPATH MODELPATH TAG [extra pipeline logp flags]" >&2
  exit 2
fi
datapath=${1%/}; modelpath=$2; tag=$3; shift 3
source "$(dirname "$0")/_launch.sh"
path_name TAG "$tag"
logp_ds=${ds:-ddp}
ds_flags "$logp_ds"
if [ "$DS_KIND" != ddp ] && [ "$DS_KIND" != single ]; then
  echo "run_logp.sh: ds=$logp_ds shards nothing here (pipeline logp is data-parallel); launching ddp" >&2
  logp_ds=ddp
fi
launch_prefix "$logp_ds"
# a raw logged parquet is prepared (possibly long) only once the knobs above are known to be good
prepared_data "$datapath" "${rkey:-normalized_reward}" "${rspkey:-unprocessed_response}"
datapath=$PREPARED
bsz=${bsz:-8}; ml=${ml:-2000}
if [ -n "${out:-}" ] && [ -z "${logpout:-}" ]; then
  echo "run_logp.sh: out=$out is train.sh's model folder, not read here; the logps go to ${datapath}_${tag}_logp (set logpout= to move them)" >&2
fi
run_or_print "${LAUNCH[@]}" -m pipeline.cli logp \
  --data_path "$datapath" --model_name_or_path "$modelpath" --tag "$tag" \
  --output_dir "${logpout:-${datapath}_${tag}_logp}" --max_length "$ml" --token_budget $((bsz * ml)) "$@"
