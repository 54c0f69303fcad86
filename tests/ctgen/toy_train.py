"""A toy model and data pipeline for the training-loop tests (importable by spawned workers).

The model has what makes resuming hard: dropout (global RNG), a LayerNorm and an embedding (no
weight decay), a buffer updated in forward (like a VQ EMA codebook) and an optional
``torch.autograd.grad`` inside forward (like VQGAN's adaptive weight). The data pipeline draws
its samples from ``ctx.generator()`` and adds global-RNG noise, so data order and RNG streams
both matter.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctgen.models.base import ModelOutput, PretrainedMixin

DIM_IN, DIM_OUT = 6, 3


@dataclass(frozen=True)
class ToyConfig:
    hidden: int = 16  # hidden width
    dropout: float = 0.1  # dropout after the first layer (uses the global torch RNG)
    n_classes: int = 4  # embedding table size for the class-conditioning input
    adaptive_grad: bool = False  # call torch.autograd.grad inside forward (VQGAN-style)


@dataclass
class ToyOutput(ModelOutput):
    mse: torch.Tensor
    reg: torch.Tensor


class ToyModel(PretrainedMixin, nn.Module):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.n_classes, DIM_IN)
        self.fc1 = nn.Linear(DIM_IN, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden, DIM_OUT)
        self.register_buffer("running_mean", torch.zeros(DIM_IN))  # updated in forward
        self.fault: tuple[str, int] | None = None  # ("sigterm" | "raise", step): test fault injection
        self.nan_steps: Collection[int] = ()  # steps whose loss is NaN (test fault injection)
        self.inf_steps: Collection[int] = ()  # steps whose inputs hold an inf, as a corrupt volume's (test fault injection)

    def predict(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.gelu(self.norm(self.fc1(x + self.embed(c)))))  # (B, hidden)
        return self.fc2(h)  # (B, DIM_OUT)

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, step: int = 0) -> ToyOutput:
        if self.fault is not None and self.fault[1] == step:
            if self.fault[0] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError(f"injected crash at step {step}")
        if step in self.inf_steps:
            x = x.clone()
            x[0, 0] = float("inf")  # the buffer below turns inf, and the loss NaN
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.float().mean(0), 0.1)
        pred = self.predict(x, c)
        mse = F.mse_loss(pred.float(), y)
        reg = 1e-3 * self.fc2.weight.float().pow(2).mean()
        loss = mse + reg
        if step in self.nan_steps:
            loss = loss * float("nan")  # a bf16 overflow, a corrupt volume: no buffer is touched, the gradient is NaN
        if self.config.adaptive_grad and torch.is_grad_enabled():
            (g,) = torch.autograd.grad(mse, self.fc2.weight, retain_graph=True)
            loss = mse + reg * (1.0 / (g.norm() + 1e-4)).detach().clamp(max=10.0)
        return ToyOutput(loss=loss, mse=mse.detach(), reg=reg.detach())


W_TRUE = torch.linspace(-1, 1, DIM_IN * DIM_OUT).reshape(DIM_IN, DIM_OUT)


def global_micro_batches(epoch: int, seed: int, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The epoch's ``n`` micro-batches, shuffled from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    x = torch.randn(n * batch_size, DIM_IN, generator=g)
    c = torch.randint(0, 4, (n * batch_size,), generator=g)
    y = x @ W_TRUE + 0.1 * torch.randn(n * batch_size, DIM_OUT, generator=g)
    order = torch.randperm(n * batch_size, generator=g)
    x, c, y = x[order], c[order], y[order]
    return [{"x": x[i * batch_size:(i + 1) * batch_size], "c": c[i * batch_size:(i + 1) * batch_size],
             "y": y[i * batch_size:(i + 1) * batch_size]} for i in range(n)]


class MakeBatches:
    """``make_batches(ctx)``: this rank's share (every world_size-th) of the epoch's micro-batches.

    ``noise`` > 0 adds global-RNG noise to x per micro-batch (an augmentation drawn from the
    training process's RNG), so a resume must restore the RNG after fast-forwarding;
    ``same_every_epoch`` repeats epoch 0's data (to overfit it).
    """

    def __init__(self, per_epoch: int = 5, noise: float = 0.0, same_every_epoch: bool = False):
        self.per_epoch, self.noise, self.same = per_epoch, noise, same_every_epoch

    def __call__(self, ctx):
        epoch = 0 if self.same else ctx.epoch
        for mb in global_micro_batches(epoch, ctx.seed, self.per_epoch, ctx.batch_size)[ctx.rank::ctx.world_size]:
            if self.noise:
                mb = {**mb, "x": mb["x"] + self.noise * torch.randn(mb["x"].shape)}
            yield mb


def ddp_worker(rank: int, world: int, port: int, out: str, train_kwargs: dict) -> None:
    """One torchrun-like process: DDP gradients of one accumulation step, then ``train()``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from ctgen.training.loop import TrainConfig, accumulate_gradients, train
    from ctgen.training import distributed as distr

    distr.setup("cpu")  # joins via the env vars, as under torchrun
    torch.manual_seed(0)
    model = ToyModel(ToyConfig(dropout=0.0))
    ddp = DistributedDataParallel(model)
    micro = global_micro_batches(0, 0, 4, 2)[rank::world]
    accumulate_gradients(ddp, micro, step=0, ddp=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # autograd.grad inside forward (VQGAN's adaptive weight) must not upset DDP's reducer
    torch.manual_seed(0)
    adaptive = ToyModel(ToyConfig(dropout=0.0, adaptive_grad=True))
    accumulate_gradients(DistributedDataParallel(adaptive), micro, step=0, ddp=True)
    adaptive_grads = {n: p.grad.clone() for n, p in adaptive.named_parameters()}
    torch.save({"grads": grads, "adaptive": adaptive_grads}, f"{out}/grads{rank}.pt")
    torch.manual_seed(0)
    model = ToyModel(ToyConfig(dropout=0.0))
    train(model, MakeBatches(per_epoch=6), TrainConfig(**train_kwargs), f"{out}/run", checkpoint_dir=f"{out}/ckpt")
    torch.distributed.destroy_process_group()  # the group is ours here, not train()'s


def ddp_signal_worker(rank: int, world: int, port: int, out: str, deadline_on_rank1: bool = False) -> None:
    """A signal that reaches rank 1 only (in its third step): every rank must stop there and exit 75.

    ``deadline_on_rank1``: no signal, but rank 1 alone knows a job deadline within the stop margin (so it stops
    after the first step); rank 0, which records the stop, knows none."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in ("SLURM_JOB_ID", "CTGEN_JOB_DEADLINE"):  # no job deadline known
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    import time

    from ctgen.training.loop import TrainConfig, train

    torch.manual_seed(0)
    model = ToyModel(ToyConfig(dropout=0.0))
    if rank == 1 and deadline_on_rank1:
        os.environ["CTGEN_JOB_DEADLINE"] = str(time.time() + 100)
    elif rank == 1:
        model.fault = ("sigterm", 2)
    cfg = TrainConfig(max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=0, log_every=1, seed=0,
                      tensorboard=False, device="cpu", ckpt_every=100, stop_margin_s=300)
    train(model, MakeBatches(per_epoch=6), cfg, f"{out}/run", checkpoint_dir=f"{out}/ckpt")  # Preempted: exit 75
