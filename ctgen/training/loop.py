"""The one training loop shared by the CT-ViT tokenizer, MaskGIT and the super-resolution model.

nanoGPT's recipe: DDP iff ``RANK`` is set (torchrun; gloo on CPU, NCCL on GPU), gradient
accumulation divided by the world size with gradient sync only on the last micro-step, bf16
autocast on GPU only, AdamW with decay/no-decay groups, warmup + cosine LR, gradient clipping.
Beyond nanoGPT: EMA weights, and a checkpoint (``ctgen.training.checkpoint``) with the model,
optimiser, scheduler, EMA, step, data position and all RNG states, written atomically every
``ckpt_every`` steps and resumed automatically, so a run killed by a Slurm time limit continues
where it stopped and reproduces the losses of an uninterrupted run.

A step whose gradient is not finite is skipped (``max_nonfinite_steps`` in a row fail), and no checkpoint or model
with non-finite weights is written.

Pre-emption: SIGTERM or SIGUSR1, or the job's time limit coming within ``stop_margin_s`` (plus two
steps; ``ctgen.training.deadline``), makes the loop finish the current step, write the checkpoint and
raise :class:`Preempted` (a ``SystemExit`` with code ``EXIT_PREEMPTED`` = 75, EX_TEMPFAIL).

Data: ``make_batches(ctx)`` returns this rank's micro-batches for epoch ``ctx.epoch``; it must be
deterministic given ``(ctx.seed, ctx.epoch, ctx.rank)`` (seed shuffles from ``ctx.generator()``,
not from the global RNGs). On resume the loop re-creates the current epoch's iterator at the
micro-batch it stopped at: sources marked ``resumes_at_start`` (the streamed shards of
``ctgen.data.batches.streamed``) start there themselves from ``ctx.start`` without reading what
they skip; for any other source the loop replays and drops the consumed micro-batches. Either way
the resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ctgen.models import base as model_base
from ctgen.training import checkpoint as ckpt
from ctgen.training import distributed as distr
from ctgen.training.deadline import Deadline
from ctgen.training.ema import EMA
from ctgen.training.launch import check_grad_accum
from ctgen.training.metrics import MetricsWriter
from ctgen.training.optim import build_optimizer, build_scheduler, resumable_state
from ctprep.memory import peak_rss_bytes
from ctprep.settings import check_fields

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the checkpoint is written, rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after a stop signal once the checkpoint is saved; exits the process with code 75."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


RUN_ONLY = ckpt.RUN_ONLY  # the TrainConfig fields that decide how a run works, not what it trains (see there)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 10_000  # optimiser steps in total (across resumes)
    batch_size: int = 1  # micro-batch size per process, handed to make_batches via ctx
    grad_accum: int = 1  # micro-steps per optimiser step over ALL processes; divided by world size
    lr: float = 3e-4  # peak learning rate, reached after warmup
    min_lr: float = 3e-5  # cosine floor, reached at max_steps
    warmup_steps: int = 500  # linear warmup from ~0 to lr
    schedule: str = "cosine"  # "cosine" (decay to min_lr) or "constant" after warmup
    weight_decay: float = 0.01  # AdamW decay on matrices/kernels only (see training.optim)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    ema_decay: float = 0.0  # EMA of the weights per step, e.g. 0.999; 0 = no EMA
    ema_start: int = 0  # the EMA copies the weights until this step, then averages
    ckpt_every: int = 500  # write checkpoints/last.pt every N steps (and at the end)
    log_every: int = 10  # CSV/TensorBoard row and log line every N steps
    seed: int = 0  # global seed; each rank seeds its RNGs with seed + rank
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp32"; "bf16" (autocast)
    num_workers: int = 0  # data-loading workers, handed to make_batches via ctx
    device: str = "auto"  # "auto": cuda:LOCAL_RANK if available else cpu; or "cpu", "cuda", ...
    find_unused_parameters: bool = False  # DDP: only for models that skip parameters in some steps
    tensorboard: bool = True  # also write TensorBoard events to out_dir/tb
    stop_margin_s: float = 120.0  # checkpoint and stop (exit 75) this long (+ 2 steps) before the job's time limit
    max_nonfinite_steps: int = 10  # fail after this many steps in a row with a NaN/inf gradient (each one is skipped)

    def __post_init__(self):
        checks = {
            "max_steps >= 1": self.max_steps >= 1, "batch_size >= 1": self.batch_size >= 1,
            "grad_accum >= 1": self.grad_accum >= 1, "0 < lr": self.lr > 0,
            "0 <= min_lr <= lr": 0 <= self.min_lr <= self.lr, "warmup_steps >= 0": self.warmup_steps >= 0,
            "schedule in (cosine, constant)": self.schedule in ("cosine", "constant"),
            "grad_clip >= 0": self.grad_clip >= 0, "0 <= ema_decay < 1": 0 <= self.ema_decay < 1,
            "ckpt_every >= 1": self.ckpt_every >= 1, "log_every >= 1": self.log_every >= 1,
            "max_nonfinite_steps >= 1": self.max_nonfinite_steps >= 1,
            "seed >= 0": self.seed >= 0,  # the data shuffles (SeedSequence) failed on one at the first batch, unnamed
            "precision in (auto, fp32, bf16)": self.precision in ("auto", "fp32", "bf16"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig: need {', '.join(bad)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From plain config data (e.g. ``config["train"]["ctvit"]``); unknown keys and values of the wrong type
        are an error naming the key (``ctprep.settings``)."""
        return cls(**check_fields(cls, values, "train"))


@dataclass(frozen=True)
class BatchContext:
    """What ``make_batches`` gets: which rank's data, which epoch, and how to seed its shuffles."""

    rank: int
    world_size: int
    epoch: int
    seed: int
    device: torch.device
    batch_size: int
    num_workers: int
    start: int = 0  # the micro-batch of the epoch to begin with (a resumed run), for sources that can skip

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from (seed, epoch, rank) alone, for shuffles and augmentation."""
        mixed = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))


class _Batches:
    """An endless stream of micro-batches: one ``make_batches`` iterator per epoch, with its position."""

    def __init__(self, make_batches: Callable[[BatchContext], Iterable[dict]], info: distr.DistInfo,
                 cfg: TrainConfig, epoch: int = 0, pos: int = 0):
        self.make_batches, self.info, self.cfg = make_batches, info, cfg
        self.epoch, self.pos, self.it = epoch, 0, None
        if pos:
            self._fast_forward(pos)

    def _start_epoch(self, start: int = 0) -> None:
        ctx = BatchContext(self.info.rank, self.info.world_size, self.epoch, self.cfg.seed, self.info.device,
                           self.cfg.batch_size, self.cfg.num_workers, start)
        self.it, self.pos = iter(self.make_batches(ctx)), start

    def _fast_forward(self, pos: int) -> None:
        if getattr(self.make_batches, "resumes_at_start", False):  # the source skips by itself, reading nothing
            self._start_epoch(pos)
            log.info("resumed data at epoch %d, micro-batch %d", self.epoch, pos)
            return
        self._start_epoch()
        for _ in range(pos):
            try:
                next(self.it)
            except StopIteration:
                log.warning("epoch %d has fewer than %d micro-batches now; starting the next", self.epoch, pos)
                self.epoch, self.it = self.epoch + 1, None
                return
            self.pos += 1
        log.info("resumed data at epoch %d after skipping %d micro-batches", self.epoch, pos)

    def __next__(self) -> dict:
        for attempt in range(2):
            if self.it is None:
                self._start_epoch()
            try:
                batch = next(self.it)
                self.pos += 1
                return batch
            except StopIteration:
                if self.pos == 0:
                    raise RuntimeError(f"make_batches yielded nothing for epoch {self.epoch} "
                                       f"on rank {self.info.rank}") from None
                self.epoch, self.it = self.epoch + 1, None
        raise AssertionError("unreachable")


class _StopFlag:
    """Remembers a SIGTERM/SIGUSR1 so the loop can stop at the next step boundary."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("got %s: will checkpoint and exit after this step", signal.Signals(signum).name)
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def accumulate_gradients(model: nn.Module, micro_batches: list[dict], *, step: int, ddp: bool,
                         autocast: contextlib.AbstractContextManager | None = None,
                         collect_logs: bool = False) -> list[dict[str, float]]:
    """Forward/backward over ``micro_batches``, summing ``loss / len(micro_batches)`` into ``.grad``.

    Under DDP, gradients are all-reduced (averaged over ranks) only on the last micro-step; so with
    equal micro-batch sizes the result is the gradient of the mean loss over the global batch.
    Returns each micro-step's ``output.logs()`` if ``collect_logs`` (a device sync), else [].
    """
    logs = []
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if not ddp or i == n - 1 else model.no_sync()
        with sync:
            with autocast or contextlib.nullcontext():
                out = model(**batch, step=step)
            (out.loss / n).backward()
        if collect_logs:
            logs.append(out.logs())
    return logs


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_context(cfg: TrainConfig, device: torch.device):
    """(autocast context or None, the precision used): bf16 autocast where the config (or "auto" on CUDA) asks."""
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None), precision


def train(model: nn.Module, make_batches: Callable[[BatchContext], Iterable[dict[str, torch.Tensor]]],
          cfg: TrainConfig, out_dir: str | os.PathLike, *, checkpoint_dir: str | os.PathLike | None = None,
          extra_meta: dict[str, Any] | None = None) -> Path:
    """Train ``model`` (see ``ctgen.models.base`` for the contract) and save it in ``out_dir``.

    Seed the model's initialisation before calling (under DDP rank 0's weights are broadcast).
    Resumes from ``checkpoint_dir/last.pt`` (default ``out_dir/../checkpoints/<out_dir name>``)
    when present. Writes ``out_dir/{config.json, model.safetensors}``, ``out_dir/ema/`` (with
    EMA), ``metrics.csv``, ``tb/`` and ``train_summary.json``; returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "checkpoints" / out_dir.name
    info = distr.setup(cfg.device)
    try:
        with _StopFlag() as stop:
            _train(model, make_batches, cfg, out_dir, ckpt_dir, extra_meta or {}, info, stop)
    except Preempted:
        distr.teardown(info)
        raise
    except BaseException:
        if info.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: other ranks may be gone
        raise
    distr.teardown(info)
    return out_dir


def starved_gpu_advice(device: torch.device, num_workers: int) -> str | None:
    """What to say where a GPU trains with no data workers: the process decodes every volume between its steps
    and the GPU waits (a Slurm job of 1 thread per GPU, the demo config's, gets none: launch.data_workers)."""
    if device.type != "cuda" or num_workers > 0:
        return None
    return (f"training on {device} with no data workers: volumes are decoded between steps while the GPU waits; "
            "give the job more CPUs (models.resources.<model>.threads, e.g. 8 per GPU)")


def _train(model, make_batches, cfg, out_dir, ckpt_dir, extra_meta, info, stop) -> None:
    t_start = time.time()
    check_grad_accum(cfg.grad_accum, info.world_size)
    accum = cfg.grad_accum // info.world_size
    device = info.device
    if advice := starved_gpu_advice(device, cfg.num_workers):
        log.warning(advice)
    raw = model.to(device).train()
    ckpt.seed_everything(cfg.seed + info.rank)
    model_class = f"{type(raw).__module__}.{type(raw).__qualname__}"
    model_config = asdict(raw.config) if dataclasses.is_dataclass(getattr(raw, "config", None)) else {}
    state = ckpt.load_checkpoint(ckpt_dir)
    code = model_base.code_version()
    code_versions = [{"from_step": 0, **code}]  # which code trained the weights, from which step on
    if state is not None:
        ckpt.check_compatible(state, model_class, model_config, asdict(cfg), ckpt_dir / ckpt.CHECKPOINT_NAME)
        resumed = _code_versions(state, code, cfg.max_steps, ckpt_dir)
        if resumed is None:  # a finished run of other code: its weights are not this code's
            state = None
        else:
            code_versions = resumed
    if state is not None:
        bad = _nonfinite(state["model"]) + _nonfinite((state.get("ema") or {}).get("shadow") or {}, "ema.")
        if bad:  # written before checkpoints were checked: its weights would be saved as the model
            log.warning("%s holds non-finite weights (%s): training afresh", ckpt_dir / ckpt.CHECKPOINT_NAME,
                        ", ".join(bad[:5]))
            state = None
    if state is not None and state["step"] > cfg.max_steps:  # its weights are past what this config asks for
        raise ValueError(f"{ckpt_dir / ckpt.CHECKPOINT_NAME} is at step {state['step']}, past max_steps "
                         f"{cfg.max_steps}: raise max_steps, or delete the checkpoint to train {cfg.max_steps} steps")
    if state is not None:
        try:
            raw.load_state_dict(state["model"])
        except RuntimeError as err:  # same class and config, other parameters: written by code that built it otherwise
            raise ValueError(f"{ckpt_dir / ckpt.CHECKPOINT_NAME}: its weights do not fit this code's model "
                             f"({' '.join(str(err).split())[:300]}); delete it to train afresh") from err
    net = raw
    if info.ddp:
        net = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=cfg.find_unused_parameters)
    optimizer = build_optimizer(raw, cfg.lr, cfg.weight_decay, cfg.betas, device)
    scheduler = build_scheduler(optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule)
    ema = EMA(raw, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay > 0 and info.is_main else None
    step, epoch, pos, train_time, last_loss = 0, 0, 0, 0.0, None
    skipped, skipped_in_a_row = 0, 0  # steps whose gradient was not finite (not applied): in all, and the last ones
    stops: list[dict] = []  # the run's earlier stops (signal or time limit), carried by the checkpoint
    rank_state = None
    if state is not None:
        decays = [g["weight_decay"] for g in optimizer.param_groups]  # this config's, which loading replaces
        optimizer.load_state_dict(resumable_state(state["optimizer"], raw, cfg.weight_decay))
        scheduler.load_state_dict(state["scheduler"])
        # the schedule is the current config's (e.g. a longer max_steps), only the step is restored
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group, decay in zip(optimizer.param_groups, decays):
            group["lr"] = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
            # the current config's weight decay and betas, not the checkpoint's (its moments are kept)
            group["weight_decay"], group["betas"] = decay, tuple(cfg.betas)
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, train_time, last_loss = state["step"], state["train_time_s"], state.get("last_loss")
        stops = list(state.get("stops", []))
        skipped, skipped_in_a_row = state.get("skipped_steps", 0), state.get("skipped_in_a_row", 0)
        ranks = state["ranks"]
        if len(ranks) == info.world_size:
            rank_state = ranks[info.rank]
            epoch, pos = rank_state["epoch"], rank_state["pos"]
        else:
            log.warning("checkpoint from %d processes, now %d: data order and RNG streams will differ, and the rest "
                        "of epoch %d is re-planned for %d processes, so some of its samples are read twice and others "
                        "not at all (from the next epoch on, every sample once)", len(ranks), info.world_size,
                        ranks[0]["epoch"], info.world_size)
            epoch, pos = ranks[0]["epoch"], ranks[0]["pos"] * len(ranks) // info.world_size
            ckpt.seed_everything(cfg.seed + info.rank + 1_000_003 * step)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", ckpt_dir, step, epoch, pos)
        del state  # free the CPU copy of the checkpoint
    batches = _Batches(make_batches, info, cfg, epoch, pos)  # fast-forwards before the RNGs are restored
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"], device)
    autocast, precision = autocast_context(cfg, device)
    metrics = (MetricsWriter(out_dir, resume_step=step, tensorboard=cfg.tensorboard, history=ckpt_dir)
               if info.is_main else None)
    params = [p for p in raw.parameters() if p.requires_grad]
    is_tty = sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not info.is_main, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0 if is_tty else 30.0, desc=out_dir.name)
    log.info("training %s on %d process(es), %s, %s: %d micro-steps of %d per process per step",
             model_class, info.world_size, device, precision, accum, cfg.batch_size)
    start_step, t_loop, t_window, window_start = step, time.time(), time.time(), step
    deadline = Deadline.from_environment(cfg.stop_margin_s)
    step_s = 0.0  # the slowest recent step, for the deadline's margin

    def save_state() -> None:
        # every rank checks its own copy (the same weights under DDP), so all fail together instead of waiting
        bad = _nonfinite(raw.state_dict()) + (_nonfinite(ema.shadow, "ema.") if ema is not None else [])
        if bad:
            raise RuntimeError(f"step {step}: non-finite values in {', '.join(bad[:5])}"
                               f"{' ...' if len(bad) > 5 else ''}; not saved over the last checkpoint in {ckpt_dir}")
        per_rank = {"rng": ckpt.rng_state(device), "epoch": batches.epoch, "pos": batches.pos}
        gathered = distr.gather_to_main(per_rank, info)
        if info.is_main:
            if metrics is not None:  # first: a copy ahead of the checkpoint only has rows to drop
                metrics.snapshot(ckpt_dir)
            ckpt.save_checkpoint({
                "step": step, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                "ranks": gathered, "world_size": info.world_size, "train_config": asdict(cfg),
                "model_class": model_class, "model_config": model_config,
                "train_time_s": train_time + time.time() - t_loop, "last_loss": last_loss, "stops": stops,
                "code_versions": code_versions, "skipped_steps": skipped, "skipped_in_a_row": skipped_in_a_row,
            }, ckpt_dir)
            log.info("checkpoint at step %d -> %s", step, ckpt_dir / ckpt.CHECKPOINT_NAME)

    try:
        while step < cfg.max_steps:
            t_step = time.time()
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
            lr = optimizer.param_groups[0]["lr"]
            micro = [_to_device(next(batches), device) for _ in range(accum)]
            # what the forward pass updates in place (BatchNorm statistics, the VQ codebook's moving averages): kept,
            # so that a skipped step leaves the model as it was (an inf batch made them NaN, and every step after)
            buffers = [b for b in raw.buffers() if b.is_floating_point()]
            kept = [b.detach().clone() for b in buffers]
            terms = accumulate_gradients(net, micro, step=step, ddp=info.ddp, autocast=autocast, collect_logs=log_now)
            # freed now: the list lived on until the next step's was built, 2 * accum micro-batches at the peak. A
            # step's micro-batches are still all fetched before its first forward, so at most accum are held: a source
            # may draw from the global RNGs as it yields (the tests' noise) as the forward does (dropout, text drop),
            # and fetching each one just before its forward would interleave the draws and change the weights
            del micro
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # a NaN/inf gradient (a bf16 overflow, a corrupt volume) applied made every later weight and checkpoint NaN;
            # the norm is of the all-reduced gradients, so every rank skips the same steps
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                skipped_in_a_row = 0
            else:
                with torch.no_grad():
                    for b, k in zip(buffers, kept):
                        b.copy_(k)
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                log.warning("step %d: gradient norm %s, update skipped (%d in a row, %d in all)", step + 1,
                            float(grad_norm), skipped_in_a_row, skipped)
                if skipped_in_a_row >= cfg.max_nonfinite_steps:
                    raise RuntimeError(f"step {step + 1}: {skipped_in_a_row} steps in a row with a non-finite gradient "
                                       f"(max_nonfinite_steps); the last checkpoint in {ckpt_dir} is kept")
            scheduler.step()  # a skipped step still counts: the schedule follows the step, as a resume restores it
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None and finite:
                ema.update(raw, step)
            bar.update(1)
            if log_now:
                row = {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]}
                row["grad_norm"] = float(grad_norm)
                if skipped:
                    row["skipped_steps"] = skipped
                row = distr.mean_over_ranks(row, info)
                last_loss = row["loss"]
                now = time.time()
                steps_per_s = (step - window_start) / max(now - t_window, 1e-9)
                t_window, window_start = now, step
                if metrics is not None:
                    metrics.write({"step": step, "epoch": batches.epoch, "lr": lr, **row, "steps_per_s": steps_per_s,
                                   "samples_per_s": steps_per_s * cfg.batch_size * cfg.grad_accum,
                                   "elapsed_s": train_time + now - t_loop})
                    bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{lr:.2e}", refresh=False)
                    log.info("step %d/%d loss %.5g lr %.3g grad_norm %.3g %.2f steps/s", step, cfg.max_steps,
                             row["loss"], lr, row["grad_norm"], steps_per_s)
            step_s = max(0.9 * step_s, time.time() - t_step)
            out_of_time = step < cfg.max_steps and deadline.due(step_s)
            # a signal in the last step: nothing is left to resume, so the run finishes and writes its model
            signalled = stop.signum is not None and step < cfg.max_steps
            # agreed by every rank, as each sees its own signals and reads the job's time left itself (rank 0 records
            # the stop: a time limit only another rank reached read "signal on another rank" with no time left):
            # why (2 a time limit, 1 a signal, 0 none) and the least time left read (negated, for the maximum)
            left = deadline.left()
            why_code, neg_left = distr.max_over_ranks([2 if out_of_time else 1 if signalled else 0,
                                                       -math.inf if left is None else -left], info)
            left = None if neg_left == -math.inf else -neg_left
            preempt = why_code > 0
            if preempt:  # recorded in the checkpoint, so the finished run's summary lists every stop
                reason = (signal.Signals(stop.signum).name if stop.signum is not None
                          else "time limit" if why_code == 2 else "signal on another rank")
                stops.append({"step": step, "exit_code": EXIT_PREEMPTED, "job": os.environ.get("SLURM_JOB_ID"),
                              "reason": reason, "time_left_s": None if left is None else round(left, 1)})
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or preempt:
                save_state()
            if preempt:
                why = ("by signal" if stop.signum is not None
                       else f"ahead of the job's time limit ({left:.0f} s left)" if why_code == 2 and left is not None
                       else "ahead of the job's time limit" if why_code == 2 else "by a signal to another rank")
                log.warning("stopped %s at step %d; exiting with code %d to be resumed", why, step, EXIT_PREEMPTED)
                raise Preempted(step)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if info.is_main:
        extra_meta = {**extra_meta, "code_versions": code_versions}
        _save_final(raw, ema, cfg, out_dir, extra_meta, info, precision, step, start_step, last_loss,
                    time.time() - t_start, train_time + time.time() - t_loop, time.time() - t_loop, stops, skipped)


def _nonfinite(tensors: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """The names of the floating-point tensors holding a NaN or an inf."""
    return [prefix + k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _code_versions(state, current, max_steps, ckpt_dir) -> list[dict] | None:
    """The code versions that trained the checkpoint's weights (``{from_step, git, source_sha256}``), with the current
    code added where it differs and trains on; None for a finished checkpoint of other code, which is not reused.

    The checkpoint folder is keyed by config and data alone: a rerun after a code change (``snakemake -R``) found the
    finished checkpoint of the old code, trained 0 steps and saved its weights stamped with the new code's hashes. An
    unfinished one resumes (a time-limit retry after a small fix), and the model's provenance lists both versions."""
    versions = [dict(v) for v in state.get("code_versions") or [{"from_step": 0, "git": None, "source_sha256": None}]]
    last, step = versions[-1], state["step"]
    if last["source_sha256"] == current["source_sha256"]:
        return versions
    if last["source_sha256"] is None:  # written before checkpoints recorded it: nothing to compare
        log.warning("%s does not record the code that trained it: resuming at step %d", ckpt_dir, step)
    elif step >= max_steps:
        log.warning("%s is a finished run (step %d) of other code (git %s, sources %s; now %s, %s): training afresh",
                    ckpt_dir, step, last["git"], last["source_sha256"], current["git"], current["source_sha256"])
        return None
    else:
        log.warning("resuming at step %d a run of other code (git %s, sources %s; now %s, %s): the model's "
                    "provenance lists both", step, last["git"], last["source_sha256"], current["git"],
                    current["source_sha256"])
    if step < max_steps:
        versions.append({"from_step": step, **current})
    return versions


def _save_final(raw, ema, cfg, out_dir, extra_meta, info, precision, step, start_step, last_loss,
                wall_s, train_s, loop_s, stops, skipped) -> None:
    """Raw weights in ``out_dir``, EMA weights in ``out_dir/ema`` (both recording this ``run``, which
    :func:`ctgen.models.base.weights_folder` checks), and ``train_summary.json``. A training without EMA removes
    the ``ema/`` an earlier one left (sampling and the evaluation would have used those old weights)."""
    bad = _nonfinite(raw.state_dict()) + (_nonfinite(ema.shadow, "ema.") if ema is not None else [])
    if bad:  # never a model that samples NaN (the checkpoints are checked as well)
        raise RuntimeError(f"non-finite values in {', '.join(bad[:5])}: the model is not saved to {out_dir}")
    meta = {"train": asdict(cfg), "run": uuid.uuid4().hex[:16], **extra_meta}
    raw.save_pretrained(out_dir, seed=cfg.seed, **meta)
    if ema is not None:
        with ema.swapped_into(raw):
            raw.save_pretrained(out_dir / "ema", seed=cfg.seed, ema_decay=cfg.ema_decay, **meta)
    elif (Path(out_dir) / "ema").exists():
        log.info("removing %s/ema, left by an earlier training (this one keeps no EMA)", out_dir)
        shutil.rmtree(Path(out_dir) / "ema")
    if info.device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(info.device), "cuda_max_allocated_bytes"
    else:
        peak, peak_kind = peak_rss_bytes(), "cpu_max_rss_bytes"  # VmHWM: ru_maxrss carries a parent's peak over exec
    summary = {
        "steps": step, "steps_this_run": step - start_step, "final_loss": last_loss,
        "wall_time_s": round(wall_s, 3), "train_time_s_all_runs": round(train_s, 3),
        "steps_per_s": (step - start_step) / loop_s if loop_s > 0 and step > start_step else None,
        "world_size": info.world_size, "device": str(info.device), "precision": precision,
        "peak_memory_bytes": int(peak), "peak_memory_kind": peak_kind,
        "skipped_steps": skipped,  # steps with a non-finite gradient, not applied
        "stops": stops,  # where earlier jobs of this run stopped and exited 75 to be resumed (step, reason, job)
    }
    if info.device.type == "cuda":  # what the caching allocator held at most (allocated + cached blocks)
        summary["peak_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(info.device))
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("saved %s (%d steps, final loss %s)", out_dir, step, last_loss)
