"""A torchrun-like worker for the DDP tests: two steps of one tiny model under DDP (importable by spawn)."""

from __future__ import annotations

import os

import torch


def ddp_two_steps(rank: int, world: int, port: int, kind: str, out: str) -> None:
    """Two optimiser steps of ``kind`` wrapped in DDP with find_unused_parameters=False (the loop's default).

    Every sample keeps its text (cond_drop_prob 0) and the tokenizer stays before its adversarial start:
    a parameter that only sometimes enters the graph makes DDP's reducer fail on the second step.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from ctgen.jobs.train import build_model, fit_text_dims
    from ctgen.training import distributed as distr
    from tests.ctgen.tiny import GENERATOR, SUPERRES, TEXT, TOKENIZER

    distr.setup("cpu")
    torch.manual_seed(0)
    model_cfg = {"tokenizer": TOKENIZER, "generator": {**GENERATOR, "cond_drop_prob": 0.0},
                 "superres": {**SUPERRES, "cond_drop_prob": 0.0}}[kind]
    cfg = {"model": model_cfg, "data": {}}
    if kind != "tokenizer":
        cfg = fit_text_dims({**cfg, "text_encoder": {**TEXT, "vocab_size": 50}})
    model = build_model(kind, cfg)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    text = {"text_ids": torch.randint(5, 50, (2, 6), generator=g), "text_mask": torch.ones(2, 6, dtype=torch.bool)}
    batch = {"tokenizer": {"video": torch.rand(2, 1, 8, 8, 8, generator=g) * 2 - 1},
             "generator": {"tokens": torch.randint(0, 32, (2, 5, 2, 2), generator=g), **text},
             "superres": {"hr": torch.rand(2, 1, 16, 16, generator=g) * 2 - 1,
                          "lr": torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, **text}}[kind]
    for step in range(2):
        opt.zero_grad()
        ddp(**batch, step=step).loss.backward()
        opt.step()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    torch.save({"unused": unused}, f"{out}/ddp_{kind}_{rank}.pt")
    torch.distributed.destroy_process_group()
