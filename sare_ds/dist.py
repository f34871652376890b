"""Process-group set-up for every launcher: `deepspeed`, `torchrun` and `mpirun`.

`deepspeed` and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; under
`mpirun` (Open MPI) only OMPI_COMM_WORLD_* exist, and DeepSpeed's MPI discovery (mpi4py)
derives the rest, with rank 0's address broadcast as the rendezvous. The backend is nccl on
GPUs and gloo on CPU (oneCCL is not available on CPU machines here).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group ((0, 1) without one): the
    package's one rank/world helper (sare_ds.eval.distributed and sare_ds.train.checkpoint use it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def launched_by_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ and "RANK" not in os.environ


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device."""
    import deepspeed
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ and not launched_by_mpi():
            # A plain `python launch/train.py` with a DeepSpeed config: a world of one.
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launched_by_mpi(), verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (itself in one process). A collective: every rank must call it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)  # nccl: on the current CUDA device (set by init_distributed)
    return box[0]


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average scalar tensors over ranks with one all-reduce (used at the logging interval only)."""
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).reshape(()).float() for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.unbind()))


def release_deepspeed_shm(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer, if it made one.

    DeepSpeed's CPU communication op (DS_ACCELERATOR=cpu, all ranks on one host) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (tens of MB) and never
    unlinks it (DeepSpeed 0.19, csrc/cpu/comm/shm.cpp): every CPU run left one per rank behind, and
    /dev/shm is memory (a session of test runs had 20 GB there and the next run was OOM-killed).
    Called once every rank is past the last collective (mappings stay valid until the processes exit).
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except OSError:
        pass


def shutdown() -> None:
    """Tear the process group down explicitly before the interpreter exits.

    Left to interpreter exit, gloo's worker threads can be destroyed while joinable
    ("terminate called without an active exception", seen under mpirun), turning a finished
    run into an aborted process.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        barrier()
        rank = dist.get_rank()
        dist.destroy_process_group()
        release_deepspeed_shm(rank)


def exit_process(code: int) -> None:
    """Leave now with `code`, after `shutdown()`: flush stdio, finalise MPI if it was started, then
    `os._exit`, skipping interpreter teardown.

    Even with the process groups destroyed, gloo worker threads were still seen torn down while
    joinable at interpreter exit under mpirun on a loaded machine ("terminate called without an
    active exception", SIGABRT after the run had finished and written everything). Nothing is
    left to do at that point but to leave with the run's own exit code.
    """
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    release_deepspeed_shm(launcher_rank())  # also on error exits (shutdown() did it on success)
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        if code == 0:
            mpi.Finalize()
        elif mpi.COMM_WORLD.Get_size() > 1:
            # Finalize would wait for every rank, and a rank-local error leaves the others in a
            # collective: end the whole job with this code instead (mpirun reports it).
            mpi.COMM_WORLD.Abort(code)
    os._exit(code)


def run_main(main) -> None:
    """The entry point of a launch/ script that may run under a distributed launcher: call `main()`,
    tear the process groups down, and leave through `exit_process` with main's code (an int it
    returns, 0 for None). An exception prints its traceback and leaves with code 1 without waiting
    for the other ranks (MPI jobs are aborted; the deepspeed launcher kills the peers)."""
    import traceback

    try:
        code = main()
        shutdown()
    except SystemExit as e:  # argparse and explicit exits keep their code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(int(code or 0))


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 when there is none), readable before any
    process group exists: torchrun / deepspeed (RANK) and mpirun (OMPI_COMM_WORLD_RANK, PMI_RANK)."""
    import os

    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
