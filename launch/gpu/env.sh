# shellcheck shell=bash
# XLA and NCCL settings for GPU training (sourced by slurm.sbatch and ssh_hosts.sh).
# Each has a default that an exported value overrides; GPU_ENV names them for the
# launchers that forward them to other hosts.

# JAX preallocates this fraction of each GPU's memory (default 0.75): more room for activations.
: "${XLA_PYTHON_CLIENT_MEM_FRACTION:=0.90}"
# The latency-hiding scheduler overlaps the FSDP all-gathers and reduce-scatters with compute;
# the combine thresholds merge small collectives into fewer, larger ones.
: "${XLA_FLAGS:=--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_gather_combine_threshold_bytes=134217728 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 --xla_gpu_all_reduce_combine_threshold_bytes=134217728}"
# NCCL logs warnings only; set INFO to see the topology, transport and interfaces it picked.
: "${NCCL_DEBUG:=WARN}"
# Interfaces NCCL may use for bootstrap and socket traffic: none of docker's bridges or loopback.
: "${NCCL_SOCKET_IFNAME:=^docker,lo}"
# The tf.data input pipeline's TensorFlow logs: warnings and errors only.
: "${TF_CPP_MIN_LOG_LEVEL:=1}"
# NCCL_IB_HCA (which InfiniBand adapters to use) and NCCL_NET_GDR_LEVEL (GPUDirect RDMA) are
# cluster-specific: export them before launching if your fabric needs them; they are forwarded.
export XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS NCCL_DEBUG NCCL_SOCKET_IFNAME TF_CPP_MIN_LOG_LEVEL
# shellcheck disable=SC2034  # read by the scripts that source this file
GPU_ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS NCCL_DEBUG NCCL_SOCKET_IFNAME TF_CPP_MIN_LOG_LEVEL NCCL_IB_HCA NCCL_NET_GDR_LEVEL)
