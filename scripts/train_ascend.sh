#!/usr/bin/env bash
# Launch `dimoo train` on Ascend NPUs with torchrun: one node or many (run this script on every node).
#
#   single node:  scripts/train_ascend.sh configs/train/dimoo_8b_ascend.yaml [key=value ...]
#   check only:   NNODES=2 scripts/train_ascend.sh CONFIG --check   (or --plan: memory per rank; starts nothing)
#   two nodes:    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/train_ascend.sh CONFIG   # on node 0
#                 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/train_ascend.sh CONFIG   # on node 1
#
# The world size (NNODES x NPUS_PER_NODE) must equal tp x pp x dp of the config; the layout is checked
# before torchrun starts. output_dir and data.shards must be on a filesystem every node sees.
# The environment below follows MindSpeed-MM's launch scripts (see ../shared/spec/ASCEND.md, section 1).
set -euo pipefail

CONFIG=${1:?usage: scripts/train_ascend.sh CONFIG.yaml [key=value ...]}
shift

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}

# CANN: toolkit environment (older installs: ascend-toolkit, newer: cann).
for env_script in /usr/local/Ascend/cann/set_env.sh /usr/local/Ascend/ascend-toolkit/set_env.sh; do
  if [ -f "$env_script" ]; then
    # shellcheck disable=SC1090
    source "$env_script"
    break
  fi
done
if [ -f /usr/local/Ascend/nnal/atb/set_env.sh ]; then
  # shellcheck disable=SC1091
  source /usr/local/Ascend/nnal/atb/set_env.sh
fi

export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}            # level-2 task queue (binary kernels)
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}            # bind host threads near their NPU
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}                # fuse discontiguous-tensor copies
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}   # seconds to set up links between nodes
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
export ACLNN_CACHE_LIMIT=${ACLNN_CACHE_LIMIT:-100000}
export NPU_ASD_ENABLE=${NPU_ASD_ENABLE:-0}                  # silent-data-corruption check off (as MindSpeed-MM)
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}  # errors only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# HCCL_SOCKET_IFNAME (e.g. eth0) picks the host NIC when a node has several; set it in the environment.

# --check / --plan: the layout check or the memory plan of this world size only; no torchrun, no node contacted.
for arg in "$@"; do
  case "$arg" in --check | --plan) WORLD_SIZE=$((NNODES * NPUS_PER_NODE)) exec dimoo train "$CONFIG" "$@" ;; esac
done
WORLD_SIZE=$((NNODES * NPUS_PER_NODE)) dimoo train "$CONFIG" "$@" --check

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m dimoo_npu.cli train "$CONFIG" "$@"
