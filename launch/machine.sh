# Sourced by launch/quickstart.sh and launch/toy_rho_sweep.sh (after PY is set): the machine's
# training settings, so runs that are compared share them, and a free rendezvous port.
#   GPUs: DS_ACCELERATOR=cuda, one rank per GPU, ZeRO-3 bf16.
#   none: DS_ACCELERATOR=cpu, 2 ranks (gloo), ZeRO-3 fp32, one OpenMP thread a rank.
NUM_GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NUM_GPUS" -gt 0 ]; then
  export DS_ACCELERATOR=cuda
  RANKS="$NUM_GPUS"; DS_CONFIG=ds_configs/zero3_bf16.json; DTYPE=bfloat16
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  RANKS=2; DS_CONFIG=ds_configs/zero3_cpu_fp32.json; DTYPE=float32
fi
# Another job on this machine may hold deepspeed's default port 29500.
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
