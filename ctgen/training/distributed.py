"""Process-group setup for the training loop, and how to launch it under torchrun / Slurm.

DDP is on iff ``RANK`` and ``WORLD_SIZE`` are set (torchrun sets them, with ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``), as in nanoGPT. The backend is gloo on CPU and NCCL on CUDA;
each process drives ``cuda:LOCAL_RANK``. A process group initialised by the caller is reused and
left alone at the end.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Signals torchrun's agent forwards to its workers: its defaults plus SIGUSR1 (Slurm's usual
# "time limit soon" signal, ``#SBATCH --signal=USR1@300``), so the loop can checkpoint and exit.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, its device, and whether it set up the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ddp: bool  # a process group is in use (torchrun or the caller's)
    owns_group: bool  # we called init_process_group, so we destroy it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def device_option(text: str) -> str:
    """An argparse ``type`` for ``--device``: a torch device this machine has, else argparse's one-line error
    (a misspelt device failed deep in torch, and ``cuda`` on a machine without a GPU after the work began)."""
    import argparse

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count or 'no'} CUDA device{'s' * (count != 1)}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no MPS device on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: ctgen runs on cpu, cuda or mps")
    return text


def process_group_args(device: torch.device) -> dict:
    """``init_process_group`` arguments for this rank's device: NCCL bound to the GPU, or gloo on the CPU."""
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device}  # device_id: eager NCCL init, no device guessing
    return {"backend": "gloo", "device_id": None}


def setup(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if the env says so; pick and select this rank's device."""
    if ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or dist.is_initialized():
        owns = not dist.is_initialized()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives and object gathers use the current device
        if owns:
            dist.init_process_group(**process_group_args(device))
        rank, world = dist.get_rank(), dist.get_world_size()
        log.info("DDP rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, device,
                 dist.get_backend())
        return DistInfo(rank, world, local_rank, device, ddp=True, owns_group=owns)
    device = resolve_device(device_name, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(0, 1, 0, device, ddp=False, owns_group=False)


def teardown(info: DistInfo) -> None:
    """Wait for every rank, then destroy the process group if we created it."""
    if info.ddp and dist.is_initialized():
        dist.barrier()
        if info.owns_group:
            dist.destroy_process_group()


def max_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Each value's maximum over ranks, on every rank (a stop that only some ranks saw stops them all)."""
    if not info.ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over ranks (every rank must log the same keys)."""
    if not info.ddp or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / info.world_size).tolist()))


def gather_to_main(obj, info: DistInfo) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); pickled between our own processes only."""
    if not info.ddp:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# c10d rendezvous port on the allocation's first host: one per Slurm job (two multi-node jobs that share a
# first host, e.g. the tokenizer and super-resolution trainings side by side, would both bind torchrun's usual
# 29500), in a range below Linux's ephemeral ports (32768-60999) so that no outgoing connection holds it
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 10000


def rdzv_port(job_id: str | int | None) -> int:
    """The rendezvous port of Slurm job ``job_id`` (torchrun's usual 29500 outside Slurm)."""
    if job_id is None or not str(job_id).isdigit():
        return 29500
    return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN


def torchrun_command(nproc: int, nnodes: int | None, script_args: list[str], *, port: int | None = None,
                     shutdown_timeout: int = 600, env: dict[str, str] | None = None) -> list[str]:
    """The ``torch.distributed.run`` (torchrun) command for ``script_args`` on this node.

    One node: ``--standalone``. Several (``nnodes`` or ``$SLURM_NNODES`` > 1): c10d rendezvous at
    ``$MASTER_ADDR:port`` with ``$SLURM_JOB_ID`` as the rendezvous id (``port``: by default one per job,
    ``rdzv_port``); run it once per node
    (``srun --ntasks-per-node=1``). SIGUSR1 is forwarded to the workers, and they get
    ``shutdown_timeout`` seconds to finish a step and write the checkpoint before SIGKILL.
    """
    env = dict(os.environ if env is None else env)
    nnodes = int(nnodes if nnodes is not None else env.get("SLURM_NNODES", 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout}"]
    if nnodes <= 1:
        cmd.append("--standalone")
    else:
        master = env.get("MASTER_ADDR")
        if not master:
            raise ValueError("several nodes need MASTER_ADDR (e.g. the first host of "
                             "`scontrol show hostnames $SLURM_JOB_NODELIST`)")
        port = rdzv_port(env.get("SLURM_JOB_ID")) if port is None else port
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{port}",
                f"--rdzv-id={env.get('SLURM_JOB_ID', 'ctgen')}"]
    return cmd + list(script_args)


def launch_info() -> str:
    """How to run the training loop on one process, one node, or several Slurm nodes."""
    return f"""\
ctgen training runs as one process, or one process per GPU under torchrun (DDP on iff RANK is set).
  one process:   ctgen train ...            (CPU or one GPU; bf16 autocast on GPU)
  one node:      python -m torch.distributed.run --standalone --nproc-per-node=N \\
                     --signals-to-handle={FORWARDED_SIGNALS} --shutdown-timeout=600 -m ctgen.cli train ...
  Slurm nodes:   export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)
                 srun --ntasks-per-node=1 python -m torch.distributed.run --nnodes=$SLURM_NNODES \\
                     --nproc-per-node=$SLURM_GPUS_ON_NODE --rdzv-backend=c10d \\
                     --rdzv-endpoint=$MASTER_ADDR:$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN})) \\
                     --rdzv-id=$SLURM_JOB_ID ... -m ctgen.cli train ...
  (torchrun_command() builds these.) The checkpoint folder must be on a filesystem all nodes share.
Pre-emption: ask Slurm for a warning signal (#SBATCH --signal=USR1@300, or TERM); the loop then
writes its checkpoint at the next step boundary and exits with code 75 (EX_TEMPFAIL); torchrun
itself then exits non-zero. Requeue or rerun the same command: it resumes from last.pt.
"""
