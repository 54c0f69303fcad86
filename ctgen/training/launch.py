"""The command prefix a training rule runs ``train ...`` under: one process, torchrun, or srun + torchrun.

Rules write ``{params.launch} train MODEL ...``; this module decides what ``launch`` is from the
job's GPU and node counts, so the shell lines stay the same on a laptop, one GPU node and a
multi-node Slurm allocation.
"""

from __future__ import annotations

import shlex

from ctgen.training.distributed import FORWARDED_SIGNALS, RDZV_PORT_BASE, RDZV_PORT_SPAN

def processes(gpus: int, nodes: int = 1) -> int:
    """The training processes of a job with ``gpus`` GPUs per node on ``nodes`` nodes (:func:`launch_prefix`: one
    per GPU, one per node without a GPU): the world size its ``grad_accum`` is divided over."""
    return max(int(gpus), 1) * max(int(nodes), 1)


def check_grad_accum(grad_accum: int, world: int, detail: str = "") -> None:
    """``grad_accum`` counts micro-steps over all processes: each takes the same share of them. ``detail``: how
    the processes come about, for the message."""
    if grad_accum % world:
        raise ValueError(f"grad_accum {grad_accum} is not a multiple of the {world} processes its training job runs"
                         f"{detail}: make it a multiple of {world}")


def process_threads(threads: int, gpus: int) -> int:
    """Each process's share of a node's ``threads``: one process per GPU, never below one thread."""
    return max(int(threads) // max(int(gpus), 1), 1)


def data_workers(threads: int, gpus: int) -> int:
    """DataLoader workers of each process on a node with ``gpus`` GPUs (per node): the rest of its share of the
    threads; none on the CPU, where the decoding would compete with the model's own threads."""
    return process_threads(threads, gpus) - 1 if gpus else 0


def launch_prefix(gpus: int, nodes: int = 1, threads: int | None = None) -> str:
    """``ctgen`` for CPU or one GPU; torchrun with one process per GPU otherwise (``gpus`` per node).

    ``threads``: the job's CPUs per node. Each process gets its share as ``OMP_NUM_THREADS`` (Snakemake exports
    the whole count, which torchrun keeps, so every rank would use all of them), and the multi-node srun asks for
    the node's CPUs and GPUs explicitly (a nested step would otherwise get one CPU and no GPU option).

    One node: ``torchrun --standalone`` (a local rendezvous on a free port). Several nodes: ``srun``
    starts one torchrun per node, with a c10d rendezvous on the first host of the allocation and the
    Slurm job id as rendezvous id and, through ``distributed.rdzv_port``, a port of its own. The srun is a
    step nested in the executor's own job step, hence ``--overlap`` (share the allocation's CPUs and GPUs; a
    step gets all of the job's GPUs by default).
    The executor plugin strips most ``SLURM_*`` variables from the step (not ``SLURM_JOB_ID``), and
    rules' shells run under ``set -u``: the node list is asked of squeue when it is missing.
    """
    gpus, nodes = int(gpus), int(nodes)
    if gpus <= 1 and nodes <= 1:
        return "ctgen"
    share = [] if not threads else ["env", f"OMP_NUM_THREADS={process_threads(threads, gpus)}"]
    torchrun = [*share, "python", "-m", "torch.distributed.run", f"--nproc-per-node={max(gpus, 1)}",
                f"--signals-to-handle={FORWARDED_SIGNALS}", "--shutdown-timeout=600"]
    if nodes <= 1:
        return " ".join(map(shlex.quote, [*torchrun, "--standalone", "-m", "ctgen.cli"]))
    # the plugin strips SLURM_JOB_NODELIST from the step but keeps SLURM_JOB_ID: ask squeue for the nodes
    job_id = '"${SLURM_JOB_ID:?multi-node training runs inside a Slurm job}"'
    port = f"$(({RDZV_PORT_BASE} + {job_id} % {RDZV_PORT_SPAN}))"  # rdzv_port() in shell
    nodelist = f'"${{SLURM_JOB_NODELIST:-$(squeue -h -o %N -j {job_id})}}"'
    master = f'"$(scontrol show hostnames {nodelist} | head -n1)"'
    # a CPU-only job has no GPU to ask for: --gpus-per-node=1 would make Slurm refuse the step on CPU nodes
    per_node = [f"--gpus-per-node={gpus}"] if gpus > 0 else []
    per_node += [f"--cpus-per-task={int(threads)}"] if threads else []
    return (f"srun --overlap --kill-on-bad-exit=1 --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 "
            + " ".join([*per_node, *map(shlex.quote, torchrun)])
            + f" --nnodes={nodes} --rdzv-backend=c10d --rdzv-endpoint={master}:{port}"
            + f" --rdzv-id={job_id} -m ctgen.cli")
