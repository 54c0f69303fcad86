"""The command prefix a training rule runs ``train ...`` under: one process, torchrun, or srun + torchrun.

Rules write ``{params.launch} train MODEL ...``; this module decides what ``launch`` is from the
job's GPU and node counts, so the shell lines stay the same on a laptop, one GPU node and a
multi-node Slurm allocation.
"""

from __future__ import annotations

import shlex

from ctgen.training.distributed import FORWARDED_SIGNALS


def launch_prefix(gpus: int, nodes: int = 1) -> str:
    """``ctgen`` for CPU or one GPU; torchrun with one process per GPU otherwise.

    Several nodes: ``srun`` starts one torchrun per node (c10d rendezvous on the first host of the
    allocation, the Slurm job id as rendezvous id); environment variables are read with defaults,
    since the rules' shells run under ``set -u``.
    """
    gpus, nodes = int(gpus), int(nodes)
    if gpus <= 1 and nodes <= 1:
        return "ctgen"
    torchrun = ["python", "-m", "torch.distributed.run", f"--nproc-per-node={max(gpus, 1)}",
                f"--signals-to-handle={FORWARDED_SIGNALS}", "--shutdown-timeout=600"]
    if nodes <= 1:
        return " ".join(map(shlex.quote, [*torchrun, "--standalone", "-m", "ctgen.cli"]))
    master = '"$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n1)"'
    return (f"srun --nodes={nodes} --ntasks-per-node=1 " + " ".join(map(shlex.quote, torchrun))
            + f" --nnodes={nodes} --rdzv-backend=c10d --rdzv-endpoint={master}:29500"
            + ' --rdzv-id="${SLURM_JOB_ID:-ctgen}" -m ctgen.cli')
