# Shared by run_logp.sh and train.sh: builds the `accelerate launch` prefix from the users' knobs.
#   gpu          processes per node (default: GPUs visible, 0 on a CPU machine)
#   WORKER_NUM   nodes (default 1); NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node
#   NUM_GPUS     GPUs per node, used for the world size when set (else $gpu)
#   ds           the distributed setup, by name (files in accelerate_configs/ and deepspeed_configs/):
#                  zero2          DeepSpeed ZeRO-2     accelerate_configs/deepspeed_zero2.yaml + deepspeed_configs/zero2.json
#                  zero3          DeepSpeed ZeRO-3     accelerate_configs/deepspeed_zero3.yaml + deepspeed_configs/zero3.json
#                  zero3_offload  ZeRO-3, optimizer and parameters in CPU memory
#                                 accelerate_configs/deepspeed_zero3_offload.yaml + deepspeed_configs/zero3_offload.json
#                  fsdp2          PyTorch FSDP2        accelerate_configs/fsdp2.yaml
#                  ddp            plain DDP (also: multi_gpu, none)   --multi_gpu, or accelerate_configs/multi_gpu.yaml
#                  single_gpu     one process on one GPU              accelerate_configs/single_gpu.yaml
#                  multi_node     accelerate_configs/multi_node.yaml (ZeRO-2); any name above also spans nodes
#                  PATH.json      your own DeepSpeed config;  PATH.yaml  your own accelerate config
#                (deepspeed_zero2 etc., the accelerate file names, work too). Config files are passed by
#                absolute path, so the scripts run from any directory.
#   dryrun=1     print the command instead of running it
# With WORKER_NUM > 1 every node runs the same command; --num_machines, --machine_rank $NODE_RANK,
# --main_process_ip $MASTER_ADDR and --main_process_port $MASTER_PORT are added (and DeepSpeed starts its
# local processes itself: --deepspeed_multinode_launcher standard, no pdsh/ssh).
# On a machine with no GPU the launch falls back to one CPU process (ds is checked, then not used; a gpu=N
# copied from a GPU node's job says so in one line), so the same command runs a small trial; with
# WORKER_NUM > 1 and no GPU, or gpu=N above the GPUs visible, it stops with one line instead.
# The launch goes through `python -m pipeline.launch` with the interpreter of this checkout's .venv (else
# $PYTHON, else python3): a stage's one-line error is then the last line of the output, once, exit status 2.
LAUNCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$LAUNCH_ROOT/.venv/bin/python" ]; then PY=$LAUNCH_ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
DS_NAMES="zero2 zero3 zero3_offload fsdp2 ddp single_gpu multi_node"

detect_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

# ds_flags NAME: sets DS_FLAGS (accelerate flags choosing the setup) and DS_KIND (ddp | single | deepspeed | config)
ds_flags() {
  local name=$1 acc=$LAUNCH_ROOT/accelerate_configs dsc=$LAUNCH_ROOT/deepspeed_configs
  DS_FLAGS=()
  case "$name" in
    ddp | multi_gpu | none | "") DS_KIND=ddp ;;
    single_gpu | single) DS_KIND=single; DS_FLAGS=(--config_file "$acc/single_gpu.yaml") ;;
    zero2 | deepspeed_zero2 | zero3 | deepspeed_zero3 | zero3_offload | deepspeed_zero3_offload)
      name=${name#deepspeed_}
      DS_KIND=config
      DS_FLAGS=(--config_file "$acc/deepspeed_$name.yaml" --deepspeed_config_file "$dsc/$name.json") ;;
    fsdp2 | fsdp) DS_KIND=config; DS_FLAGS=(--config_file "$acc/fsdp2.yaml") ;;
    multi_node) DS_KIND=config; DS_FLAGS=(--config_file "$acc/multi_node.yaml" --deepspeed_config_file "$dsc/zero2.json") ;;
    *.json)
      [ -f "$name" ] || { echo "ds=$name: file not found" >&2; exit 2; }
      DS_KIND=deepspeed; DS_FLAGS=(--use_deepspeed --deepspeed_config_file "$name") ;;
    *.yaml | *.yml)
      [ -f "$name" ] || { echo "ds=$name: file not found" >&2; exit 2; }
      DS_KIND=config; DS_FLAGS=(--config_file "$name") ;;
    *)
      echo "ds=$name: unknown setup; use one of: $DS_NAMES, or a path to a DeepSpeed .json or accelerate .yaml" >&2
      exit 2 ;;
  esac
}

# launch_prefix [DS]: sets LAUNCH (the accelerate command up to the module) and ON_CPU (1 or 0)
launch_prefix() {
  local visible; visible=$(detect_gpus)
  local gpus=${gpu:-$visible}
  local nodes=${WORKER_NUM:-1}
  local me; me=$(basename "$0")
  case "$gpus" in ''|*[!0-9]*) echo "$me: error: gpu='$gpus' must be a whole number of GPUs per node" >&2; exit 2 ;; esac
  ds_flags "${1:-ddp}"
  if [ "${dryrun:-0}" = "1" ]; then visible=$gpus; fi  # a dry run prints the command for the node asked for
  if [ "$gpus" -gt 0 ] && [ "$visible" -eq 0 ]; then
    if [ "$nodes" -gt 1 ]; then
      echo "$me: error: gpu=$gpus and WORKER_NUM=$nodes, but no GPU is visible on this node (nvidia-smi finds none); run it on the GPU nodes" >&2
      exit 2
    fi
    echo "$me: gpu=$gpus asked, but no GPU is visible here: running the CPU trial (one process${1:+, without ds=$1})" >&2
    gpus=0
  elif [ "$gpus" -gt "$visible" ]; then
    echo "$me: error: gpu=$gpus asked, but this node has $visible GPU(s) visible; set gpu=$visible or less" >&2
    exit 2
  fi
  local per_node=${NUM_GPUS:-$gpus}
  if [ "$gpus" -eq 0 ]; then
    if [ "$nodes" -gt 1 ]; then
      echo "$me: error: WORKER_NUM=$nodes, but no GPU is visible on this node; a CPU trial runs on one node only (unset WORKER_NUM)" >&2
      exit 2
    fi
    ON_CPU=1
    LAUNCH=("$PY" -m pipeline.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no)
    return
  fi
  ON_CPU=0
  if [ "$DS_KIND" = single ]; then
    if [ "$nodes" -gt 1 ]; then echo "ds=single_gpu runs one process; unset WORKER_NUM" >&2; exit 2; fi
    per_node=1
  fi
  local total=$((per_node * nodes))
  LAUNCH=("$PY" -m pipeline.launch "${DS_FLAGS[@]}" --num_processes "$total" --num_machines "$nodes" --mixed_precision bf16)
  if [ "$DS_KIND" = ddp ] && [ "$total" -gt 1 ]; then LAUNCH+=(--multi_gpu); fi
  if [ "$nodes" -gt 1 ]; then
    LAUNCH+=(--machine_rank "${NODE_RANK:?NODE_RANK is required when WORKER_NUM > 1}"
             --main_process_ip "${MASTER_ADDR:?MASTER_ADDR is required when WORKER_NUM > 1}"
             --main_process_port "${MASTER_PORT:-29500}")
    if [ "$DS_KIND" = deepspeed ]; then LAUNCH+=(--deepspeed_multinode_launcher standard); fi
  fi
}

run_or_print() {
  local args=()
  for a in "$@"; do [ -n "$a" ] && args+=("$a"); done  # drop emptied entries
  if [ "${dryrun:-0}" = "1" ]; then printf '%q ' "${args[@]}"; echo; else exec "${args[@]}"; fi
}

# path_name WHAT VALUE: VALUE becomes part of a folder name; refuse separators, "." and ".." in one line
path_name() {
  case "$2" in
    ""|.|..|*/*) echo "$(basename "$0"): error: $1 '$2' becomes part of a folder name: use a name without '/', and not '.' or '..'" >&2; exit 2 ;;
  esac
}

# prepared_data DATA REWARDKEY RSPKEY: sets PREPARED and RAW (1 when DATA is the users' raw logged parquet).
# A `pipeline prepare` output is used as it is. Raw data (a parquet file, a glob or a folder of them) is
# prepared first, with REWARDKEY/RSPKEY naming its columns, into STEM_prepared (knob `prep` overrides): the
# folder is reused when complete and made from the same files and settings, and prepared again when the
# data changed. With several nodes, node 0 prepares (the folder must be on a shared filesystem) and the
# others wait for it.
prepared_data() {
  local data=${1%/} me; me=$(basename "$0")
  RAW=0; PREPARED=$data
  if [ -f "$data/manifest.json" ] && grep -q '"stage": "prepare"' "$data/manifest.json"; then return; fi
  if [ ! -e "$data" ] && ! compgen -G "$data" >/dev/null; then return; fi  # not there: the stage says so
  RAW=1
  local stem=${data%.parquet}; stem=${stem//\*/all}
  PREPARED=${prep:-${stem}_prepared}
  local args=(--data_path "$1" --output_dir "$PREPARED" --reward_key "$2" --response_key "$3" --reuse true)
  if [ "${dryrun:-0}" = "1" ]; then printf '%q ' "$PY" -m pipeline.cli prepare "${args[@]}" >&2; echo >&2; return; fi
  if [ "${NODE_RANK:-0}" = "0" ]; then
    echo "$me: preparing the raw data $1 -> $PREPARED (reused when complete and unchanged)" >&2
    "$PY" -m pipeline.cli prepare "${args[@]}" >&2
  else
    local waited=0
    until [ -f "$PREPARED/manifest.json" ]; do
      sleep 10; waited=$((waited + 10))
      if [ "$waited" -ge "${prep_wait:-3600}" ]; then
        echo "$me: error: node ${NODE_RANK} waited ${waited} s for node 0 to prepare $PREPARED (a shared filesystem is required)" >&2
        exit 2
      fi
    done
  fi
}
