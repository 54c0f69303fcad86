"""The one training loop: DDP equivalence, exact resume, checkpoints, schedule, EMA, metrics."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from ctgen.training.loop import EXIT_PREEMPTED, Preempted, TrainConfig, accumulate_gradients, train
from ctgen.training import checkpoint as ckpt
from ctgen.training.distributed import torchrun_command
from ctgen.training.ema import EMA
from ctgen.training.optim import lr_at, param_groups
from toy_train import MakeBatches, ToyConfig, ToyModel, ddp_signal_worker, ddp_worker, global_micro_batches

# 9 steps of 2 micro-batches over 5-micro-batch epochs: epochs end mid-step; checkpoints at 3, 6, 9
BASE = dict(max_steps=9, batch_size=4, grad_accum=2, lr=1e-2, min_lr=1e-3, warmup_steps=2, log_every=1,
            ckpt_every=3, ema_decay=0.8, ema_start=2, seed=7, tensorboard=False)


def run(tmp: Path, fault=None, cfg=None, model_cfg=ToyConfig(), expect=None, batches=None, nan_steps=(),
        inf_steps=()):
    """Train a seeded toy model into tmp/out (checkpoints in tmp/ckpt); return the model."""
    torch.manual_seed(123)
    model = ToyModel(model_cfg)
    model.fault, model.nan_steps, model.inf_steps = fault, nan_steps, inf_steps
    args = (model, batches or MakeBatches(per_epoch=5, noise=0.05), cfg or TrainConfig(**BASE), tmp / "out")
    if expect is None:
        train(*args, checkpoint_dir=tmp / "ckpt", extra_meta={"stage": "toy"})
    else:
        with pytest.raises(expect) as info:
            train(*args, checkpoint_dir=tmp / "ckpt")
        model.exc = info.value
    return model


def csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    model = run(tmp)
    return tmp, model


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = csv_rows(a), csv_rows(b)
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 10)]  # no duplicated rows
    for key in ("loss", "mse", "lr", "grad_norm", "epoch"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key  # bitwise (repr of floats)
    for sub in ("", "ema"):
        wa = ToyModel.from_pretrained(a / sub).state_dict()
        wb = ToyModel.from_pretrained(b / sub).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub


def test_uninterrupted_run_outputs(reference):
    tmp, model = reference
    out = tmp / "out"
    rows = csv_rows(out)
    assert len(rows) == 9
    assert {"step", "epoch", "lr", "loss", "grad_norm", "mse", "reg", "steps_per_s", "samples_per_s"} <= set(rows[0])
    assert [int(r["epoch"]) for r in rows] == [0, 0, 1, 1, 1, 2, 2, 3, 3]  # 2 micro-batches/step, 5/epoch
    assert float(rows[0]["lr"]) == pytest.approx(lr_at(0, 1e-2, 1e-3, 2, 9, "cosine"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 9 and summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["final_loss"] == float(rows[-1]["loss"]) and summary["peak_memory_bytes"] > 0
    meta = json.loads((out / "config.json").read_text())["provenance"]
    assert meta["seed"] == 7 and meta["train"]["max_steps"] == 9 and meta["stage"] == "toy"
    # saved weights load with from_pretrained and give identical outputs
    loaded = ToyModel.from_pretrained(out).eval()
    model.eval()
    x, c = torch.randn(5, 6), torch.randint(0, 4, (5,))
    assert torch.equal(loaded.predict(x, c), model.predict(x, c))
    assert torch.equal(loaded.running_mean, model.running_mean) and model.running_mean.abs().sum() > 0
    # the EMA weights differ from the raw ones and equal the checkpoint's shadow
    ema = ToyModel.from_pretrained(out / "ema")
    state = ckpt.load_checkpoint(tmp / "ckpt")
    assert state["step"] == 9
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in state["ema"]["shadow"].items())
    assert not torch.equal(ema.fc1.weight, loaded.fc1.weight)


def test_a_training_without_ema_removes_the_ema_an_earlier_one_left(tmp_path):
    """Sampling and the evaluation use ema/ where present: one left by an earlier training (EMA on) in the folder of
    a new one (EMA off) sampled a model nobody trained under the current config. An ema/ of another run is refused."""
    import shutil

    from ctgen.models.base import weights_folder

    run(tmp_path / "a")
    out = tmp_path / "a" / "out"
    assert weights_folder(out) == out / "ema" and weights_folder(out, use_ema=False) == out
    shutil.copytree(out / "ema", tmp_path / "old_ema")
    run(tmp_path / "a", cfg=TrainConfig(**{**BASE, "ema_decay": 0.0}))  # retrained into the same folder, no EMA
    assert not (out / "ema").exists() and weights_folder(out) == out
    shutil.copytree(tmp_path / "old_ema", out / "ema")  # an ema/ copied in from another run
    with pytest.raises(ValueError, match="another training run"):
        weights_folder(out)


def test_loop_fits_one_batch(tmp_path):
    """Sanity of the update direction: 40 steps on one fixed batch, no clipping, constant LR."""
    cfg = TrainConfig(max_steps=40, batch_size=8, lr=3e-2, warmup_steps=0, schedule="constant", grad_clip=0.0,
                      log_every=1, ckpt_every=100, tensorboard=False)
    run(tmp_path, cfg=cfg, model_cfg=ToyConfig(dropout=0.0), batches=MakeBatches(per_epoch=1, same_every_epoch=True))
    losses = [float(r["loss"]) for r in csv_rows(tmp_path / "out")]
    assert losses[-1] < 0.1 * losses[0]
    assert all(float(r["lr"]) == 3e-2 and float(r["grad_norm"]) > 0 for r in csv_rows(tmp_path / "out"))


def test_a_step_holds_at_most_its_own_micro_batches(tmp_path):
    """The previous step's micro-batches lived until the next step's were all fetched: 2 * accum at the peak
    (of 100 MB batches, 1978 MB of memory at grad_accum 8 against 642 MB at 1). Now accum: counted as each is
    fetched, by the micro-batches the loop still holds."""
    import weakref

    held, counts = [], []

    class Counted(MakeBatches):
        def __call__(self, ctx):
            for mb in super().__call__(ctx):  # noise: each x a tensor of its own, held only by the loop
                held[:] = [r for r in held if r() is not None] + [weakref.ref(mb["x"])]
                counts.append(len(held))
                yield mb

    cfg = TrainConfig(**{**BASE, "grad_accum": 3, "max_steps": 4})
    run(tmp_path, cfg=cfg, batches=Counted(per_epoch=12, noise=0.05))
    assert len(counts) == 12 and max(counts) == 3, counts


def test_bf16_autocast_path(tmp_path):
    """precision="bf16" autocasts on any device (the GPU default); here on CPU, 3 steps, with TensorBoard."""
    run(tmp_path, cfg=TrainConfig(**{**BASE, "max_steps": 3, "precision": "bf16", "tensorboard": True}))
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["precision"] == "bf16"
    events = list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    assert all(math.isfinite(float(r["loss"])) for r in csv_rows(tmp_path / "out"))


def test_sigterm_checkpoints_and_resume_reproduces(reference, tmp_path):
    model = run(tmp_path, fault=("sigterm", 4), expect=Preempted)  # signal during the 5th step
    assert model.exc.code == EXIT_PREEMPTED == 75 and model.exc.step == 5
    assert ckpt.load_checkpoint(tmp_path / "ckpt")["step"] == 5
    assert [s["reason"] for s in ckpt.load_checkpoint(tmp_path / "ckpt")["stops"]] == ["SIGTERM"]
    assert len(csv_rows(tmp_path / "out")) == 5 and not (tmp_path / "out" / "model.safetensors").exists()
    run(tmp_path)  # resumes automatically
    assert_same_run(reference[0] / "out", tmp_path / "out")
    run(tmp_path)  # a finished run resumed again only rewrites its outputs
    assert_same_run(reference[0] / "out", tmp_path / "out")


def test_a_finished_checkpoint_of_other_code_is_not_reused(reference, tmp_path, monkeypatch, caplog):
    """The checkpoint folder is keyed by config and data alone: a rerun after a code change found the old code's
    finished checkpoint, trained 0 steps and stamped its weights with the new code's hashes. It trains afresh now;
    an unfinished run of other code resumes (a time-limit retry after a fix), its provenance naming both versions."""
    from ctgen.models import base

    def provenance_of(out: Path) -> dict:
        return json.loads((out / "config.json").read_text())["provenance"]

    monkeypatch.setattr(base, "source_sha256", lambda: "old")
    run(tmp_path)
    monkeypatch.setattr(base, "source_sha256", lambda: "new")
    run(tmp_path)
    out = tmp_path / "out"
    assert json.loads((out / "train_summary.json").read_text())["steps_this_run"] == 9
    assert "finished run (step 9) of other code" in caplog.text
    assert_same_run(reference[0] / "out", out)  # the same seed, afresh
    for sub in ("", "ema"):
        prov = provenance_of(out / sub)
        assert prov["source_sha256"] == "new"
        assert [(v["from_step"], v["source_sha256"]) for v in prov["code_versions"]] == [(0, "new")]

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(base, "source_sha256", lambda: "old")
    run(resumed, fault=("sigterm", 4), expect=Preempted)
    monkeypatch.setattr(base, "source_sha256", lambda: "new")
    run(resumed)
    assert [(v["from_step"], v["source_sha256"]) for v in provenance_of(resumed / "out")["code_versions"]] == [
        (0, "old"), (5, "new")]
    assert_same_run(reference[0] / "out", resumed / "out")
    run(resumed)  # finished, by this code in part: reused
    assert json.loads((resumed / "out" / "train_summary.json").read_text())["steps_this_run"] == 0
    assert len(provenance_of(resumed / "out")["code_versions"]) == 2


def test_a_nan_gradient_is_skipped_and_never_saved(reference, tmp_path):
    """A NaN/inf step was applied: every later weight was NaN, the one good checkpoint overwritten with them, and the
    run ended "done". The step is skipped now (counted in the metrics), and too many in a row fail, naming the step."""
    run(tmp_path / "a", nan_steps={4})  # the 5th step
    out = tmp_path / "a" / "out"
    for sub in ("", "ema"):
        weights = ToyModel.from_pretrained(out / sub).state_dict()
        assert all(torch.isfinite(v).all() for v in weights.values())
    rows = csv_rows(out)
    assert math.isnan(float(rows[4]["grad_norm"])) and [r.get("skipped_steps") for r in rows] == [""] * 4 + ["1"] * 5
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == 1
    state = ckpt.load_checkpoint(tmp_path / "a" / "ckpt")
    assert state["step"] == 9 and all(torch.isfinite(v).all() for v in state["model"].values())
    # the skip resumes exactly: stopped at step 6, past the skipped step, the rest matches the run above
    run(tmp_path / "b", fault=("sigterm", 5), expect=Preempted, nan_steps={4})
    run(tmp_path / "b", nan_steps={4})
    for key in ("loss", "grad_norm", "lr", "skipped_steps"):
        assert [r[key] for r in csv_rows(tmp_path / "b" / "out")] == [r[key] for r in rows], key

    model = run(tmp_path / "c", nan_steps=range(4, 9), cfg=TrainConfig(**{**BASE, "max_nonfinite_steps": 3}),
                expect=RuntimeError)
    assert str(model.exc).startswith("step 7: 3 steps in a row with a non-finite gradient")
    state = ckpt.load_checkpoint(tmp_path / "c" / "ckpt")  # the step-3 checkpoint, not one of NaN weights
    assert state["step"] == 6 and state["skipped_in_a_row"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_skipped_step_leaves_the_buffers_and_a_nan_checkpoint_is_not_reused(tmp_path):
    """An inf input updated a buffer in the forward pass (BatchNorm statistics, the VQ codebook's averages) before its
    step was skipped: the next checkpoint was refused, on every retry. And a finished checkpoint of NaN weights,
    written before checkpoints were checked, was reused and saved as the model."""
    run(tmp_path / "a", inf_steps={4})
    out = tmp_path / "a" / "out"
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == 1
    weights = ToyModel.from_pretrained(out).state_dict()
    assert torch.isfinite(weights["running_mean"]).all() and all(torch.isfinite(v).all() for v in weights.values())
    run(tmp_path / "b")
    state = ckpt.load_checkpoint(tmp_path / "b" / "ckpt")
    state["model"]["fc2.weight"][0, 0] = float("nan")
    ckpt.save_checkpoint(state, tmp_path / "b" / "ckpt")
    run(tmp_path / "b")  # trained afresh, not the NaN weights saved as the model
    assert json.loads((tmp_path / "b" / "out" / "train_summary.json").read_text())["steps_this_run"] == 9
    assert torch.isfinite(ToyModel.from_pretrained(tmp_path / "b" / "out").state_dict()["fc2.weight"]).all()


def test_a_signal_in_the_last_step_finishes_the_run(reference, tmp_path):
    """Nothing is left to resume after the last step: a stop signal there exited 75 without writing the model."""
    run(tmp_path, fault=("sigterm", 8))  # the 9th and last step
    assert_same_run(reference[0] / "out", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["stops"] == []


def test_a_checkpoint_past_max_steps_is_refused(tmp_path):
    """Resumed with a smaller max_steps than its checkpoint's step, the run saved the over-trained model silently."""
    run(tmp_path, cfg=TrainConfig(**{**BASE, "max_steps": 6}))
    with pytest.raises(ValueError, match="step 6.*max_steps 4"):
        run(tmp_path, cfg=TrainConfig(**{**BASE, "max_steps": 4}))


def test_crash_resume_drops_rows_past_checkpoint(reference, tmp_path):
    run(tmp_path, fault=("raise", 7), expect=RuntimeError)  # dies in the 8th step
    assert ckpt.load_checkpoint(tmp_path / "ckpt")["step"] == 6
    assert len(csv_rows(tmp_path / "out")) == 7  # rows 7 was written after the last checkpoint
    run(tmp_path)
    assert_same_run(reference[0] / "out", tmp_path / "out")


def test_resume_with_other_model_config_fails(reference, tmp_path):
    run(tmp_path, fault=("raise", 3), expect=RuntimeError)
    with pytest.raises(ValueError, match="hidden"):
        run(tmp_path, model_cfg=ToyConfig(hidden=8))


def test_resume_of_a_model_with_other_parameters_fails_in_one_line(tmp_path):
    """Same class and config, other parameters (the checkpoint of other code): load_state_dict's RuntimeError."""
    run(tmp_path, fault=("sigterm", 4), expect=Preempted)  # unfinished: it would be resumed
    torch.manual_seed(123)
    model = ToyModel(ToyConfig())
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'ckpt' / 'last.pt'}: its weights do not fit this code's "
                                         r"model \(.*extra.*\); delete it to train afresh$"):
        train(model, MakeBatches(per_epoch=5, noise=0.05), TrainConfig(**BASE), tmp_path / "out",
              checkpoint_dir=tmp_path / "ckpt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path)
    state = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_checkpoint_save_removes_what_a_killed_save_left(tmp_path):
    """SIGKILL mid-save (no ``finally``) leaves its temporary file; the next save removes it."""
    ckpt.save_checkpoint({"step": 1}, tmp_path)
    (tmp_path / ".last.pt.x1y2z3.tmp").write_bytes(b"half of a killed save")
    (tmp_path / "notes.txt").write_text("a user's file")
    ckpt.save_checkpoint({"step": 2}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.txt"]
    assert ckpt.load_checkpoint(tmp_path)["step"] == 2


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_loading_never_unpickles_code(tmp_path, capsys):
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "x": Evil()}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="no readable checkpoint") as info:
        ckpt.load_checkpoint(tmp_path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError) and "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_an_unreadable_checkpoint_names_the_file_and_the_remedy(tmp_path, cut):
    """A 0-byte or truncated last.pt (a full disk, a copy cut short) gave a bare EOFError or zip error."""
    path = ckpt.save_checkpoint({"step": 1, "w": torch.ones(1000)}, tmp_path / "ckpt")
    data = path.read_bytes()
    path.write_bytes(b"" if cut == "empty" else data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{path} is no readable checkpoint \(.+\); delete it to train afresh$"):
        ckpt.load_checkpoint(tmp_path / "ckpt")
    run(tmp_path, expect=ValueError)  # train() too: a ValueError, which the command reports as one line


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    import random

    import numpy as np

    ckpt.seed_everything(3)
    torch.randn(2), np.random.rand(), random.random()
    ckpt.save_checkpoint({"rng": ckpt.rng_state(torch.device("cpu"))}, tmp_path)
    expected = (torch.randn(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    ckpt.seed_everything(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path)["rng"], torch.device("cpu"))
    got = (torch.randn(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_lr_schedule_values():
    f = lambda s, sched="cosine": lr_at(s, 1.0, 0.1, 4, 14, sched)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # linear warmup (s + 1) / (warmup + 1)
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == 0.1 and f(100) == 0.1
    assert f(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))
    assert f(9, "constant") == 1.0 and f(1, "constant") == 0.4


def test_ema_math():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5, start=1)
    for step, value in enumerate([2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, step)
    # step 1 <= start: copy (2); step 2: 0.5*2 + 0.5*4 = 3; step 3: 0.5*3 + 0.5*8 = 5.5
    assert torch.equal(ema.shadow["weight"], torch.full((1, 2), 5.5))
    with ema.swapped_into(model):
        assert torch.equal(model.weight, torch.full((1, 2), 5.5))
    assert torch.equal(model.weight, torch.full((1, 2), 8.0))


def test_param_groups_skip_bias_norm_embedding():
    model = ToyModel(ToyConfig())
    model.no_weight_decay = lambda: {"fc2.weight"}
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"fc1.weight"} and decay["weight_decay"] == 0.1
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "fc1.bias", "norm.weight", "norm.bias",
                                                          "fc2.weight", "fc2.bias"}


LAYERS = (nn.Linear, nn.modules.conv._ConvNd)  # the only weights AdamW decays


def decayed(model: nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in param_groups(model, 0.1)[0]["params"]}


def layer_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, LAYERS)}


@pytest.mark.parametrize("kind", ["generator", "superres"])
def test_param_groups_decay_only_layer_weights_of_the_text_conditioned_models(kind):
    """Position tables, the text encoder's positions and the null condition of guidance are raw parameters of
    2+ dims: each module owning one declares it (no_weight_decay), wherever the module is nested."""
    from ctgen.jobs.train import build_model, fit_text_dims
    from tiny import GENERATOR, SUPERRES, TEXT

    cfg = fit_text_dims({"model": {"generator": GENERATOR, "superres": SUPERRES}[kind], "data": {},
                         "text_encoder": {**TEXT, "vocab_size": 50}})
    model = build_model(kind, cfg)
    kept = {n for n, _ in model.named_parameters()} - decayed(model)
    assert decayed(model) <= layer_weights(model), decayed(model) - layer_weights(model)
    assert {"core.null_text", "text_encoder.position"} <= kept
    if kind == "generator":
        assert {"core.pos_emb.t", "core.pos_emb.h", "core.pos_emb.w"} <= kept


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_param_groups_decay_only_layer_weights_of_the_latent_flow(backbone):
    """The report context's segment and null tables, the joint text encoder's positions, and the DiT's
    scale-shift tables (its diffusers blocks' too) are not decayed."""
    from test_latent_flow import DIT, tiny

    from ctgen.models.latent_flow import LatentFlow

    text = {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "max_length": 32, "vocab_size": 50}
    model = LatentFlow(tiny(text_encoder=text, **(DIT if backbone == "dit" else {})))
    assert decayed(model) <= layer_weights(model), decayed(model) - layer_weights(model)
    kept = {n for n, _ in model.named_parameters()} - decayed(model)
    assert {"context.segment", "context.null", "context.encoder.position"} <= kept
    if backbone == "dit":
        assert {"dit.scale_shift_table", "dit.blocks.0.scale_shift_table"} <= kept


class Positions(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 3))

    def no_weight_decay(self) -> list[str]:
        return ["table"]


class Nested(nn.Module):
    """A raw table declared by its own (nested) module: not decayed today, decayed before 2026-12-07."""

    def __init__(self):
        super().__init__()
        self.pos, self.fc = Positions(), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x + self.pos.table).sum()


def moments(optimizer) -> dict[str, torch.Tensor]:
    """exp_avg by parameter name."""
    return {n: optimizer.state[p]["exp_avg"] for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])}


@pytest.mark.parametrize("names", [True, False], ids=["named", "before-names"])
def test_resume_matches_the_optimizer_state_by_name_across_a_new_decay_split(names):
    """A checkpoint whose optimizer split the parameters otherwise (the table decayed; written with names, or
    before they were stored) resumes with each tensor's own moments: by position the table's would have gone to
    the linear layer's weight, or the groups' sizes failed to load."""
    from ctgen.training.optim import build_optimizer, resumable_state

    torch.manual_seed(0)
    model = Nested()
    old = torch.optim.AdamW(param_groups(model, 0.1, nested=False), lr=1e-2)
    for _ in range(2):
        old.zero_grad()
        model(torch.randn(5, 4, 3)).backward()
        old.step()
    saved = old.state_dict()
    if not names:
        for group in saved["param_groups"]:
            del group["param_names"]
    assert saved["param_groups"][0]["params"] == [0, 1]  # pos.table, fc.weight decayed
    new = build_optimizer(model, 1e-2, 0.1, (0.9, 0.999), torch.device("cpu"))
    assert [g["param_names"] for g in new.param_groups] == [["fc.weight"], ["pos.table", "fc.bias"]]
    new.load_state_dict(resumable_state(saved, model, 0.1))
    want = moments(old)
    assert all(torch.equal(m, want[n]) for n, m in moments(new).items()) and len(moments(new)) == 3
    with pytest.raises(ValueError, match="checkpoint's optimizer .* another model or code version"):
        resumable_state(saved, nn.Sequential(nn.Linear(3, 2)), 0.1)


def test_config_from_dict_and_validation():
    cfg = TrainConfig.from_dict({"max_steps": 5, "betas": [0.8, 0.9]})
    assert cfg.betas == (0.8, 0.9) and cfg.max_steps == 5
    with pytest.raises(ValueError, match="unknown keys.*max_step"):
        TrainConfig.from_dict({"max_step": 5})
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match=r"TrainConfig: need seed >= 0"):
        TrainConfig.from_dict({"seed": -1})


def test_torchrun_command():
    cmd = torchrun_command(4, None, ["-m", "ctgen.cli", "train"], env={"SLURM_NNODES": "2", "MASTER_ADDR": "n01",
                                                                        "SLURM_JOB_ID": "42"})
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=n01:20042" in cmd and "--rdzv-id=42" in cmd  # a port per job
    other = torchrun_command(4, 2, [], env={"MASTER_ADDR": "n01", "SLURM_JOB_ID": "123456"})
    assert "--rdzv-endpoint=n01:23456" in other  # below the ephemeral range, so no outgoing connection holds it
    assert "--rdzv-endpoint=n01:29500" in torchrun_command(4, 2, [], env={"MASTER_ADDR": "n01"})  # outside Slurm
    assert "--nproc-per-node=4" in cmd and cmd[-3:] == ["-m", "ctgen.cli", "train"]
    assert "--standalone" in torchrun_command(2, 1, [], env={})
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        torchrun_command(2, 3, [], env={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path):
    kwargs = dict(max_steps=2, batch_size=2, grad_accum=4, lr=1e-2, warmup_steps=0, log_every=1, seed=0,
                  tensorboard=False, device="cpu")
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=ddp_worker, args=(r, 2, port, str(tmp_path), dict(kwargs))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    # one process, the whole global batch (4 micro-batches of 2) with the same code path
    torch.manual_seed(0)
    single = ToyModel(ToyConfig(dropout=0.0))
    accumulate_gradients(single, global_micro_batches(0, 0, 4, 2), step=0, ddp=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for name, p in single.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        assert all(torch.isfinite(g).all() for g in got["adaptive"].values())
    adaptive = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True)["adaptive"] for r in range(2)]
    assert all(torch.equal(adaptive[0][k], adaptive[1][k]) for k in adaptive[0])  # all-reduced
    # the same two optimiser steps through train(), one process on the whole batch
    torch.manual_seed(0)
    model = ToyModel(ToyConfig(dropout=0.0))
    train(model, MakeBatches(per_epoch=6), TrainConfig(**kwargs), tmp_path / "single", checkpoint_dir=tmp_path / "c1")
    ddp_w = ToyModel.from_pretrained(tmp_path / "run").state_dict()
    for name, w in model.state_dict().items():
        if name == "running_mean":  # a buffer updated in forward: DDP broadcasts rank 0's
            continue
        torch.testing.assert_close(ddp_w[name], w, rtol=1e-5, atol=1e-6, msg=name)
    losses = [[float(r["loss"]) for r in csv_rows(tmp_path / d)] for d in ("run", "single")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["world_size"] == 2
    ranks = ckpt.load_checkpoint(tmp_path / "ckpt")["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])


def test_metrics_history_travels_with_the_checkpoint(reference, tmp_path):
    """The output folder can vanish (make clean) or hold another run's rows: the CSV comes from
    the checkpoint's copy, so a resumed or finished run always writes its own whole history."""
    run(tmp_path, fault=("sigterm", 4), expect=Preempted)
    assert [r["step"] for r in csv_rows(tmp_path / "ckpt")] == [str(s) for s in range(1, 6)]
    # another run's rows in the output folder must not leak into this one
    stale = csv_rows(tmp_path / "out")
    for r in stale:
        r["loss"] = "123.0"
    with (tmp_path / "out" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(stale[0]))
        writer.writeheader()
        writer.writerows(stale)
    run(tmp_path)
    assert_same_run(reference[0] / "out", tmp_path / "out")
    # a finished run resumed into an emptied output folder trains no step and keeps its history
    for f in (tmp_path / "out").iterdir():
        if f.is_file():
            f.unlink()
    run(tmp_path)
    assert_same_run(reference[0] / "out", tmp_path / "out")


def test_a_signal_to_one_rank_stops_every_rank_with_75(tmp_path):
    """torchrun forwards a signal to each rank at its own moment (or to one): the ranks agree to stop at the
    same step, rank 0 checkpoints, and every rank exits 75 (to be requeued), with no job deadline known."""
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=ddp_signal_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    state = ckpt.load_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 3 and [s["reason"] for s in state["stops"]] == ["signal on another rank"]


def test_a_time_limit_on_another_rank_is_recorded_as_a_time_limit(tmp_path):
    """Each rank reads the job's time left itself: where only rank 1 found it short, rank 0 (which writes the
    checkpoint) recorded "signal on another rank" and no time left."""
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=ddp_signal_worker, args=(r, 2, port, str(tmp_path), True)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    (stop,) = ckpt.load_checkpoint(tmp_path / "ckpt")["stops"]
    assert stop["step"] == 1 and stop["reason"] == "time limit" and 0 < stop["time_left_s"] <= 100


def test_a_resumed_run_takes_the_configs_weight_decay_and_betas(tmp_path, monkeypatch):
    from ctgen.training import loop

    built = []
    original = loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    base = dict(batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=0, log_every=1, seed=0, tensorboard=False)
    for steps, wd, betas in ((2, 0.01, (0.9, 0.99)), (4, 0.5, (0.5, 0.6))):  # resumed with new settings
        torch.manual_seed(0)
        train(ToyModel(ToyConfig()), MakeBatches(), TrainConfig(max_steps=steps, weight_decay=wd, betas=betas, **base),
              tmp_path / f"out{steps}", checkpoint_dir=tmp_path / "ckpt")
    decayed, plain = built[-1].param_groups
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert decayed["betas"] == plain["betas"] == (0.5, 0.6)
    assert len(built[-1].state) > 0  # the moments came from the checkpoint


@pytest.mark.parametrize("kind", ["tokenizer", "generator", "superres"])
def test_every_parameter_is_in_the_graph_under_ddp(kind, tmp_path):
    """DDP with find_unused_parameters=False, a batch in which no sample drops its text: no crash, every
    parameter has a gradient (the super-resolution null text once entered the graph only with a drop)."""
    from tests.ctgen.ddp_worker import ddp_two_steps

    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=ddp_two_steps, args=(r, 2, port, kind, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    assert torch.load(tmp_path / f"ddp_{kind}_0.pt", weights_only=True)["unused"] == []


def test_time_left_from_squeue():
    from ctgen.training.deadline import parse_time_left

    assert parse_time_left("1-02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    assert parse_time_left("02:03:04") == (2 * 60 + 3) * 60 + 4 and parse_time_left("03:04") == 184
    assert parse_time_left("UNLIMITED") is None and parse_time_left("INVALID") is None


@pytest.mark.parametrize("squeue", ["echo INVALID", "echo 'slurm_load_jobs error' >&2; exit 1"])
def test_a_time_left_squeue_does_not_give_is_a_warning(squeue, tmp_path, monkeypatch, caplog):
    """Without the time left the run cannot stop ahead of the limit: that was logged at info level only."""
    from ctgen.training.deadline import job_deadline

    (tmp_path / "squeue").write_text(f"#!/bin/sh\n{squeue}\n")
    (tmp_path / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("CTGEN_JOB_DEADLINE", raising=False)
    with caplog.at_level("INFO", logger="ctgen.training.deadline"):
        assert job_deadline() is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "job 42" in caplog.text


def test_a_job_deadline_that_is_no_number_names_the_variable(monkeypatch):
    from ctgen.training.deadline import job_deadline

    monkeypatch.setenv("CTGEN_JOB_DEADLINE", "abc")
    with pytest.raises(ValueError, match=r"^CTGEN_JOB_DEADLINE='abc': expected .*Unix time in seconds"):
        job_deadline()
    monkeypatch.setenv("CTGEN_JOB_DEADLINE", "1735689600.5")
    assert job_deadline() == 1735689600.5


def test_stops_ahead_of_the_job_time_limit_and_resumes(reference, tmp_path, monkeypatch):
    """With the job's end closer than the margin, the loop checkpoints after one step and exits 75; run
    again without a limit, it resumes and ends with the uninterrupted run's weights and metrics."""
    import time

    monkeypatch.setenv("CTGEN_JOB_DEADLINE", str(time.time() + 100))
    cfg = TrainConfig(**{**BASE, "stop_margin_s": 300})
    model = run(tmp_path, cfg=cfg, expect=Preempted)
    assert model.exc.code == EXIT_PREEMPTED and model.exc.step == 1
    assert ckpt.load_checkpoint(tmp_path / "ckpt")["step"] == 1
    monkeypatch.setenv("CTGEN_JOB_DEADLINE", str(time.time() + 3600))  # the next attempt has time
    run(tmp_path, cfg=cfg)
    assert_same_run(reference[0] / "out", tmp_path / "out")
    stops = json.loads((tmp_path / "out" / "train_summary.json").read_text())["stops"]
    assert [(s["step"], s["reason"], s["exit_code"]) for s in stops] == [(1, "time limit", 75)]
    assert 0 < stops[0]["time_left_s"] <= 100


def test_gpu_paths_on_the_cpu():
    """What a GPU job runs differently, checked here: NCCL bound to the rank's GPU, the fused AdamW kernel
    (its CPU implementation gives the same update as the plain one), bf16 autocast by default on CUDA."""
    from ctgen.training.distributed import process_group_args
    from ctgen.training.loop import autocast_context
    from ctgen.training.optim import build_optimizer

    assert process_group_args(torch.device("cuda", 3)) == {"backend": "nccl", "device_id": torch.device("cuda", 3)}
    assert process_group_args(torch.device("cpu")) == {"backend": "gloo", "device_id": None}
    torch.manual_seed(0)
    a, b = ToyModel(ToyConfig(dropout=0.0)), ToyModel(ToyConfig(dropout=0.0))
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a, 1e-2, 0.01, (0.9, 0.99), torch.device("cuda"))  # what a CUDA job builds
    plain = build_optimizer(b, 1e-2, 0.01, (0.9, 0.99), torch.device("cpu"))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x, c, y = torch.randn(8, 6), torch.randint(0, 4, (8,)), torch.randn(8, 3)
    for model, opt in ((a, fused), (b, plain)):
        for _ in range(3):
            opt.zero_grad()
            model(x, c, y).loss.backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    ctx, precision = autocast_context(TrainConfig(), torch.device("cuda"))
    assert precision == "bf16" and ctx is not None and autocast_context(TrainConfig(), torch.device("cpu"))[1] == "fp32"


def test_the_checkpoint_folder_survives_edits_of_how_a_run_works():
    """The checkpoint folder is named by the config's hash: an edit of logging, checkpoint frequency, data workers
    or device (``RUN_ONLY``) resumes the run; one of what it trains (the learning rate) starts afresh."""
    from ctgen.jobs.config import config_hash
    from ctgen.training.loop import RUN_ONLY

    cfg = {"model": {"dim": 8}, "train": {"lr": 1e-3, "log_every": 10, "ckpt_every": 100, "num_workers": 0}, "data": {}}
    bookkeeping = {"log_every": 1, "ckpt_every": 7, "num_workers": 4, "tensorboard": False, "stop_margin_s": 60.0,
                   "device": "cpu", "find_unused_parameters": True, "max_nonfinite_steps": 3}
    assert set(bookkeeping) == set(RUN_ONLY)
    assert config_hash({**cfg, "train": {**cfg["train"], **bookkeeping}}) == config_hash(cfg)
    assert config_hash({**cfg, "train": {**cfg["train"], "lr": 2e-3}}) != config_hash(cfg)


def test_the_starved_gpu_warning_reaches_the_training_log(tmp_path, monkeypatch, caplog):
    """The loop asks starved_gpu_advice of its device and data workers and logs what it says (the advice itself:
    tests/slurm/test_launch.py); here the CPU run is made to hear it."""
    from ctgen.training import loop

    asked = []
    monkeypatch.setattr(loop, "starved_gpu_advice", lambda device, workers: asked.append((device.type, workers))
                        or "no data workers: give the job more CPUs")
    with caplog.at_level("WARNING", logger="ctgen.training.loop"):
        run(tmp_path, cfg=TrainConfig(**{**BASE, "max_steps": 1}))
    assert asked == [("cpu", 0)] and "no data workers: give the job more CPUs" in caplog.text
