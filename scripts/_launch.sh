# Shared by run_logp.sh and train.sh: builds the `accelerate launch` prefix from the users' knobs.
#   gpu          processes per node (default: GPUs visible, 0 on a CPU machine)
#   WORKER_NUM   nodes (default 1); NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node
#   NUM_GPUS     GPUs per node, used for the world size when set (else $gpu)
#   dryrun=1     print the command instead of running it
# On a machine with no GPU the launch falls back to one CPU process, so the same command runs a small trial.
detect_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

launch_prefix() {
  local gpus=${gpu:-$(detect_gpus)}
  local nodes=${WORKER_NUM:-1}
  local per_node=${NUM_GPUS:-$gpus}
  if [ "${gpus:-0}" -eq 0 ]; then
    LAUNCH=(accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no)
    return
  fi
  LAUNCH=(accelerate launch --num_processes $((per_node * nodes)) --num_machines "$nodes" --mixed_precision bf16)
  if [ $((per_node * nodes)) -gt 1 ]; then LAUNCH+=(--multi_gpu); fi
  if [ "$nodes" -gt 1 ]; then
    LAUNCH+=(--machine_rank "${NODE_RANK:?NODE_RANK is required when WORKER_NUM > 1}"
             --main_process_ip "${MASTER_ADDR:?MASTER_ADDR is required when WORKER_NUM > 1}"
             --main_process_port "${MASTER_PORT:-29500}")
  fi
}

run_or_print() {
  local args=()
  for a in "$@"; do [ -n "$a" ] && args+=("$a"); done  # drop emptied entries
  if [ "${dryrun:-0}" = "1" ]; then printf '%q ' "${args[@]}"; echo; else exec "${args[@]}"; fi
}
