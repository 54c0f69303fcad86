"""Streaming training data: the plan, exact resume with and without workers, checksums, dead workers, the loop."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from ctgen.data import batches
from ctgen.data.layout import unit_to_hu
from ctgen.data.derived import merge_derived, write_derived
from ctgen.data.stream import StreamPlan, iter_raw_samples, load_shards, member_values
from ctgen.models.classifier3d import Classifier3D, ClassifierConfig
from ctgen.training.loop import BatchContext, Preempted, TrainConfig, train
from ctprep.shards import ShardError, merge_manifests, write_shards
from ctprep.volume import Volume

WINDOW = [-1000, 1000]
CHUNKS = {"a": 7, "b": 5, "c": 4}  # shard_size 3: shards of 3, 3, 1 | 3, 2 | 3, 1 -> 7 shards, 16 samples


KEYS = [f"train_{chunk}{i}_a_1" for chunk, n in CHUNKS.items() for i in range(n)]


def _value(key: str) -> int:
    """Each sample's volume is filled with a value of its own, 100 HU from any other's."""
    return -900 + 100 * KEYS.index(key)


@pytest.fixture()
def shards(tmp_path):
    root = tmp_path / "shards"
    chunk_manifests = []
    for chunk, n in CHUNKS.items():
        samples = []
        for i in range(n):
            key = f"train_{chunk}{i}_a_1"
            vol = Volume.from_3d(np.full((4, 4, 2), _value(key), np.int16), np.diag([2.0, 2.0, 5.0, 1.0]), source=key)
            labels = np.zeros(18)
            labels[i % 18] = 1
            labels[17] = np.nan if i % 2 else 0  # unknown (a blank cell) in every other sample
            samples.append({"key": key, "volume": vol, "prompt": f"prompt {key}", "prompts": {"generatect": f"p {key}"},
                            "meta": {}, "labels": labels})
        write_shards(samples, root / f"c{chunk}", prefix=f"train-c{chunk}", shard_size=3, split="train")
        chunk_manifests.append(root / f"c{chunk}" / f"train-c{chunk}.manifest.json")
    merge_manifests(chunk_manifests, root / "manifest.json", split="train")
    return {"manifest": str(root / "manifest.json"), "chunks": [str(p) for p in chunk_manifests]}


def ctx(epoch=0, start=0, rank=0, world=1, workers=0, batch=2, seed=3):
    return BatchContext(rank, world, epoch, seed, torch.device("cpu"), batch, workers, start)


def plan(shards_, **kw):
    defaults = {"batch_size": 2, "seed": 3, "world_size": 1, "rank": 0, "num_workers": 0, "buffer": 4}
    return StreamPlan(tuple(load_shards([shards_["manifest"]])), **{**defaults, **kw})


def keys_of_epoch(p: StreamPlan, epoch: int) -> list[list[str]]:
    return [[k for _, k in p.batch_keys(epoch, j)] for j in range(p.steps_per_epoch)]


def test_plan_is_a_function_of_its_settings(shards):
    p = plan(shards, world_size=2, num_workers=2)
    assert p.total_samples == 16 and p.steps_per_epoch == 4  # 16 // (2 ranks x 2)
    assert keys_of_epoch(p, 0) == keys_of_epoch(plan(shards, world_size=2, num_workers=2), 0)
    assert keys_of_epoch(p, 0) != keys_of_epoch(p, 1)  # reshuffled per epoch
    assert keys_of_epoch(p, 0) != keys_of_epoch(dataclasses.replace(p, seed=4), 0)
    other = dataclasses.replace(p, rank=1)
    assert len(keys_of_epoch(other, 0)) == p.steps_per_epoch  # every rank the same number of micro-batches
    # over a few epochs every sample is seen by some rank
    seen = {k for e in range(6) for q in (p, other) for b in keys_of_epoch(q, e) for k in b}
    assert seen == {s for sh in load_shards([shards["manifest"]]) for s in sh.keys}


@pytest.mark.parametrize(("world", "workers", "buffer"), [(1, 0, 4), (1, 0, 64), (1, 2, 4), (2, 1, 4)])
def test_an_epoch_that_divides_evenly_reads_every_sample_once(shards, world, workers, buffer):
    """16 samples, batch 2: every epoch is a permutation of the cohort, whatever the shuffle buffer holds at the
    end of a pass (it is emptied there, as webdataset's shuffle does, not carried into the next pass)."""
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            p = plan(shards, world_size=world, rank=rank, num_workers=workers, buffer=buffer,
                     batch_size=8 // world if world > 1 else 2)
            seen += [k for batch in keys_of_epoch(p, epoch) for k in batch]
        if world == 1 and workers == 0:
            assert sorted(seen) == sorted(k for s in p.shards for k in s.keys)
        else:  # slots hold different sample counts: one that runs out starts another pass over its shards
            assert len(seen) == 16 and len(set(seen)) >= 12, (len(set(seen)), seen)


def test_shard_split_is_webdatasets(shards):
    """Slot shards are webdataset's split_by_node then split_by_worker of the epoch's shuffled list."""
    p = plan(shards, world_size=2, rank=1, num_workers=2)
    all_slots = [p.slot_shards(0, 0, w) for w in range(2)]
    ranks = [dataclasses.replace(p, rank=r) for r in range(2)]
    union = sorted(i for q in ranks for w in range(2) for i in q.slot_shards(0, 0, w))
    assert union == list(range(7))  # a partition of the shards: none twice, none left out
    # an independent computation of webdataset's semantics: islice(rank, world) then islice(worker, workers)
    order = [i for w in range(2) for i in ranks[0].slot_shards(0, 0, w)] + [i for w in range(2) for i in all_slots[w]]
    assert len(order) == len(set(order)) == 7
    env = {"RANK": "1", "WORLD_SIZE": "2", "WORKER": "1", "NUM_WORKERS": "2"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        shuffled = [*range(7)]
        import random

        from ctgen.data.stream import _mixed_seed  # the plan's seeding, to rebuild the same shuffle here

        random.Random(_mixed_seed(3, 0, 0)).shuffle(shuffled)
        # dealt largest first in a snake over the 4 slots (rounds of 4, every other one reversed)
        by_size = sorted(shuffled, key=lambda i: -len(p.shards[i].keys))
        dealt = by_size[:4] + by_size[4:8][::-1]
        expected = list(wds.split_by_worker(wds.split_by_node(dealt)))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert sorted(all_slots[1]) == sorted(expected) == sorted(dealt[1::2][1::2])
    random.Random(_mixed_seed(3, 0, 0, 1, 1)).shuffle(expected)  # then read in an order of the slot's own
    assert all_slots[1] == expected


def test_every_slot_is_dealt_about_as_many_samples():
    """A chunk's last shard is short: dealt at random, slots held different sample counts, and as each makes the
    same number of micro-batches an epoch read some samples twice and others not at all (5-10 of 88 here)."""
    from ctgen.data.stream import Shard

    sizes, n = [8, 3] * 8, 0
    shards = []
    for i, size in enumerate(sizes):
        shards.append(Shard(f"/x/{i}.tar", tuple(f"k{n + j}" for j in range(size)), "", 0, "m"))
        n += size
    for world, workers, batch in ((2, 2, 2), (1, 4, 1), (4, 0, 1)):
        for epoch in range(5):
            read = []
            for rank in range(world):
                p = StreamPlan(tuple(shards), batch, seed=1, world_size=world, rank=rank, num_workers=workers, buffer=4)
                read += [k for j in range(p.steps_per_epoch) for _, k in p.batch_keys(epoch, j)]
            assert len(read) == len(set(read)) == 88, (world, workers, epoch, 88 - len(set(read)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reads_exactly_the_rest_of_the_epoch(shards, workers):
    reads = []

    def decode(raw):
        reads.append(raw["__key__"])
        return batches.volume_decode(WINDOW)(raw)

    make = batches.streamed([shards["manifest"]], decode, batches.classifier_collate(batches.Augment(flip_w=True,
                                                                                                     intensity=0.1)))
    full = list(make(ctx(workers=workers)))
    assert len(full) == 8 and all(b["video"].shape == (2, 1, 2, 4, 4) for b in full)
    for start in (1, 3, 6):
        reads.clear()
        rest = list(make(ctx(workers=workers, start=start)))
        assert len(rest) == len(full) - start
        for a, b in zip(full[start:], rest):
            assert torch.equal(a["video"], b["video"])
            assert torch.equal(torch.nan_to_num(a["labels"], 7.0), torch.nan_to_num(b["labels"], 7.0))
        if workers == 0:  # skipped samples are never read
            assert len(reads) == (len(full) - start) * 2
    # each batch holds the samples the plan names, in its order, decoded to their own values (no augmentation)
    plain = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW),
                             batches.classifier_collate(batches.Augment()))
    p = plan(shards, num_workers=workers, buffer=16)
    for j, b in enumerate(plain(ctx(workers=workers))):
        expected = [_value(k) for _, k in p.batch_keys(0, j)]
        hu = unit_to_hu(b["video"], WINDOW).mean(dim=(1, 2, 3, 4))
        assert np.allclose(hu.numpy(), expected, atol=0.5), (j, hu, expected)


def test_unknown_labels_are_nan(shards):
    raw = dict(iter_raw_samples(shards["chunks"][0]))["train_a1_a_1"]
    labels = batches.volume_decode(WINDOW)(raw)["labels"]
    assert torch.isnan(labels[17]) and labels[1] == 1 and labels[0] == 0 and int(torch.isnan(labels).sum()) == 1
    values = dict(member_values(load_shards([shards["manifest"]]), "labels.npy"))
    assert len(values) == 16 and values["train_a1_a_1"][17] == 255


def _member_offset(url: str, member: str) -> int:
    import tarfile

    with tarfile.open(url) as tf:
        return tf.getmember(member).offset_data


@pytest.mark.parametrize("damage", ["label", "truncated"])
def test_member_values_refuses_a_changed_shard(shards, damage):
    """Labels for pos_weight, TSTR and pairing, spacings of a resize preset: a flipped label byte read back as 255
    (unknown), a truncated shard failed inside tarfile."""
    shard = load_shards([shards["manifest"]])[3]
    data = bytearray(Path(shard.url).read_bytes())
    if damage == "label":
        data[_member_offset(shard.url, f"{shard.keys[0]}.labels.npy") + 128] ^= 0xFF  # the first label (after the header)
    else:
        data = data[:-1536]
    Path(shard.url).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{Path(shard.url).name} does not match its checksum"):
        dict(member_values(load_shards([shards["manifest"]]), "labels.npy"))


def test_member_values_names_the_shard_and_sample_that_do_not_decode(shards):
    import json

    from ctprep.shards import sha256_file

    shard = load_shards([shards["manifest"]])[3]
    data = bytearray(Path(shard.url).read_bytes())
    data[_member_offset(shard.url, f"{shard.keys[1]}.labels.npy")] ^= 0xFF  # the npy magic
    Path(shard.url).write_bytes(bytes(data))
    meta = json.loads(Path(shards["manifest"]).read_text())  # the shard written so, not changed since
    next(s for s in meta["shards"] if s["file"].endswith(Path(shard.url).name))["sha256"] = sha256_file(shard.url)
    Path(shards["manifest"]).write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=rf"{Path(shard.url).name}: reading sample '{shard.keys[1]}' failed"):
        dict(member_values(load_shards([shards["manifest"]]), "labels.npy"))


@pytest.mark.parametrize("workers", [0, 2])
def test_changed_shard_is_named(shards, workers):
    shard = load_shards([shards["manifest"]])[3]
    data = bytearray(Path(shard.url).read_bytes())
    data[700] ^= 0xFF  # same size: only the checksum can tell
    Path(shard.url).write_bytes(bytes(data))
    make = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))
    with pytest.raises(ShardError, match=rf"{Path(shard.url).name} does not match its checksum") as err:
        for _ in range(3):  # every shard is read in some epoch
            list(make(ctx(workers=workers)))
    assert "\n" not in str(err.value)


def test_truncated_or_missing_shard_is_named_before_training(shards):
    shard = load_shards([shards["manifest"]])[2]
    Path(shard.url).write_bytes(Path(shard.url).read_bytes()[:-512])
    with pytest.raises(ShardError, match=rf"{Path(shard.url).name} has \d+ bytes but"):
        batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))
    os.remove(shard.url)
    with pytest.raises(ShardError, match=rf"{Path(shard.url).name} .*is missing"):
        batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))


def test_a_dead_worker_names_its_shards(shards):
    def decode(raw):
        if raw["__key__"] == "train_b1_a_1":
            os._exit(3)  # a worker killed mid-read (out of memory, a signal)
        return batches.volume_decode(WINDOW)(raw)

    make = batches.streamed([shards["manifest"]], decode, batches.tokenizer_collate(1))
    with pytest.raises(RuntimeError, match=r"data worker failed .* read .*train-cb-000000\.tar"):
        for epoch in range(4):
            list(make(ctx(epoch=epoch, workers=2)))


def test_a_users_mistake_in_a_worker_keeps_its_one_line_message(shards):
    """A prompt the shards lack raised inside a data worker: the same one-line ValueError as without workers."""
    make = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW, "no_such_prompt"),
                            batches.tokenizer_collate(1))
    messages = []
    for workers in (0, 2):
        with pytest.raises(ValueError) as err:
            list(make(ctx(workers=workers)))
        messages.append(str(err.value))
    # the same message, but for the shard and sample named (the workers read in another order)
    assert [m.split(" has ", 1)[1] for m in messages] == [messages[0].split(" has ", 1)[1]] * 2
    assert "no_such_prompt" in messages[1] and "\n" not in messages[1]
    assert "Traceback" not in messages[1] and not messages[1].startswith("ValueError")


def _read_one_epoch_spawned(manifest, queue):
    """In a process whose default start method is spawn (macOS, Python 3.14's forkserver alike)."""
    torch.multiprocessing.set_start_method("spawn", force=True)
    make = batches.streamed([manifest], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))
    queue.put(len(list(make(ctx(workers=2)))))


def test_data_workers_start_where_the_default_start_method_is_spawn(shards):
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=_read_one_epoch_spawned, args=(shards["manifest"], queue))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0 and queue.get(timeout=5) == 8


def test_a_run_resumed_at_an_epochs_end_checksums_the_next_epochs_shards(shards):
    shard = load_shards([shards["manifest"]])[3]
    data = bytearray(Path(shard.url).read_bytes())
    data[700] ^= 0xFF  # same size: only the checksum can tell
    Path(shard.url).write_bytes(bytes(data))
    make = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))
    steps = plan(shards, batch_size=1).steps_per_epoch
    assert list(make(ctx(epoch=0, start=steps, batch=1))) == []  # the checkpoint was written at the epoch's end
    with pytest.raises(ShardError, match="does not match its checksum"):
        list(make(ctx(epoch=1, batch=1)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_read_only_before_the_resume_point_is_checksummed_when_a_later_epoch_reads_it(shards, workers):
    """A run resumed mid-epoch skips the batches before its start unread: a shard all of whose samples lie there is
    hashed by the first epoch of the run that reads it (it once went unhashed for the rest of the run)."""
    p = plan(shards, num_workers=workers)
    batch_shards = [{i for i, _ in p.batch_keys(0, j)} for j in range(p.steps_per_epoch)]
    start, shard = next((s, i) for s in range(1, p.steps_per_epoch)
                        for i in set().union(*batch_shards[:s]) - set().union(*batch_shards[s:]))
    url = p.shards[shard].url
    data = bytearray(Path(url).read_bytes())
    data[700] ^= 0xFF  # same size: only the checksum can tell
    Path(url).write_bytes(bytes(data))
    make = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1), buffer=4)
    assert len(list(make(ctx(epoch=0, start=start, workers=workers)))) == p.steps_per_epoch - start
    with pytest.raises(ShardError, match=rf"{Path(url).name} does not match its checksum"):
        list(make(ctx(epoch=1, workers=workers)))  # one process, one rank: every shard is read in every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_each_shard_is_hashed_once_per_run(shards, workers, tmp_path, monkeypatch):
    """Hashing reads the whole shard (2 GB at CT-RATE's 64 volumes a shard): once a run, not once an epoch; and with
    2 workers a shard the uneven split leaves unread in epoch 0 is hashed when a later epoch reads it."""
    from ctgen.data import stream

    p = plan(shards, num_workers=workers)
    first = {i for j in range(p.steps_per_epoch) for i, _ in p.batch_keys(0, j)}
    assert len(first) == (len(p.shards) if workers == 0 else len(p.shards) - 1)  # what the test is about

    log = tmp_path / "hashed.txt"
    hash_shard = stream.verify_shard

    def counted(shard):  # forked workers inherit it and append to the same file
        with open(log, "a") as fh:
            fh.write(shard.url + "\n")
        hash_shard(shard)

    monkeypatch.setattr(stream, "verify_shard", counted)
    make = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1), buffer=4)
    for epoch in range(3):
        list(make(ctx(epoch=epoch, workers=workers)))
    hashed = log.read_text().split()
    assert sorted(hashed) == sorted(s.url for s in load_shards([shards["manifest"]]))  # each once, all of them


def test_a_manifest_or_sample_given_twice_is_refused(shards, tmp_path):
    """It read every sample of it twice an epoch without a word (pairing refused it; training did not)."""
    import shutil

    merged, chunk = Path(shards["manifest"]), Path(shards["chunks"][0])
    respelt = merged.parent / "ca" / ".." / merged.name  # the same file by another path
    copy = tmp_path / "copy"
    shutil.copytree(chunk.parent, copy)  # other files, the same keys
    for twice in ([merged, merged], [merged, respelt], [chunk, merged], [chunk, copy / chunk.name]):
        with pytest.raises(ShardError, match="is in more than one shard manifest") as err:
            batches.streamed([str(m) for m in twice], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))
        assert "\n" not in str(err.value)
    assert "key train_a0_a_1 is in" in str(err.value)  # the copy: its own files, the keys of the chunk
    make = batches.streamed([str(m) for m in shards["chunks"]], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))
    assert make.n_samples == 16  # the chunks side by side are the split once


def test_too_few_shards_for_the_ranks_says_what_to_do(shards):
    with pytest.raises(ValueError) as err:
        plan(shards, world_size=8, rank=0, num_workers=0)
    assert "lower the workers" not in str(err.value) and "shards.shard_size at most 2" in str(err.value)
    with pytest.raises(ValueError, match="lower the workers, or write smaller shards"):
        plan(shards, world_size=2, rank=0, num_workers=4)


def test_an_empty_split_is_named_as_such(tmp_path):
    """It was told to write smaller shards (shards.shard_size at most 1) or use fewer ranks."""
    write_shards([], tmp_path, "test", shard_size=2, split="test")
    manifest = str(tmp_path / "test.manifest.json")
    with pytest.raises(ValueError) as err:
        list(batches.streamed([manifest], batches.volume_decode(WINDOW), batches.tokenizer_collate(1))(ctx()))
    assert str(err.value).startswith(f"{manifest} lists no samples") and "shard_size" not in str(err.value)
    with pytest.raises(ValueError, match="the shards hold no samples"):
        StreamPlan((), batch_size=1)


def test_derived_shards_travel_alongside(shards, tmp_path):
    samples = [{"__key__": k, "recon.npy": np.full((2, 2, 2), 0.5, np.float16)}
               for k, _ in iter_raw_samples(shards["manifest"])]
    derived = write_derived(shards["manifest"], samples, tmp_path / "d", "recon", "toy@0", {"recon.npy": "test"})
    decode = batches.volume_decode(WINDOW)
    make = batches.streamed([shards["manifest"]], decode, batches.superres_collate(None, 2, 2),
                            parallel=[[str(derived)]], items_per_sample=2)
    with pytest.raises(TypeError):  # no text side given: the collate reaches for it after reading both sets
        next(iter(make(ctx(batch=4))))
    text = lambda keys, prompts: {"n": torch.tensor(len(keys))}  # noqa: E731
    make = batches.streamed([shards["manifest"]], decode, batches.superres_collate(text, 2, 2),
                            parallel=[[str(derived)]], items_per_sample=2)
    b = next(iter(make(ctx(batch=4))))
    assert b["hr"].shape == (4, 1, 4, 4) and b["lr"].shape == (4, 1, 2, 2) and torch.all(b["lr"] == 0.5)
    # derived shards of other volumes are refused
    other = merge_derived([derived], tmp_path / "d" / "all.json")
    assert other["n_samples"] == 16
    with pytest.raises(ValueError, match="not derived from"):
        batches.streamed([shards["chunks"][0]], decode, batches.tokenizer_collate(1), parallel=[[str(derived)]])
    # ... and so are those of volume shards re-made with the same keys after them (a stale cache)
    import json as _json

    manifest = Path(shards["manifest"])
    remade = _json.loads(manifest.read_text())
    remade["shards"][1]["sha256"] = "0" * 64  # what the manifest of re-made shards records
    (tmp_path / "remade.json").write_text(_json.dumps(remade))
    for s in remade["shards"]:  # the shard files, where the copied manifest looks for them
        target = tmp_path / s["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(manifest.parent / s["file"])
    with pytest.raises(ValueError, match="shard 1 was computed from another file"):
        batches.streamed([str(tmp_path / "remade.json")], decode, batches.tokenizer_collate(1), parallel=[[str(derived)]])


class _Preemptible(Classifier3D):
    fault_step: int | None = None

    def forward(self, video, labels, step=0):
        if self.fault_step == step:
            os.kill(os.getpid(), 15)
        return super().forward(video, labels, step)


@pytest.mark.parametrize("workers", [0, 2])
def test_loop_resumes_streamed_data_exactly(shards, tmp_path, workers):
    # dropout draws from the global torch RNG every step: a resumed run must restore that stream exactly
    # (a DataLoader that seeded its workers from it shifted it by one draw: found on the Slurm cluster)
    cfg = ClassifierConfig(stem_stride=(1, 2, 2), channels=(4, 8), blocks=(1, 1), norm_groups=2, head_dropout=0.3)
    tcfg = TrainConfig(max_steps=10, batch_size=2, lr=1e-2, warmup_steps=1, ckpt_every=3, log_every=1,
                       tensorboard=False, num_workers=workers, ema_decay=0.9, seed=5)

    def run(root, fault=None):
        torch.manual_seed(5)
        model = _Preemptible(cfg)
        model.fault_step = fault
        make = batches.streamed([shards["manifest"]], batches.volume_decode(WINDOW),
                                batches.classifier_collate(batches.Augment(flip_w=True, intensity=0.05)))
        train(model, make, tcfg, root / "out", checkpoint_dir=root / "ckpt")

    run(tmp_path / "a")
    with pytest.raises(Preempted):
        run(tmp_path / "b", fault=6)  # mid-epoch (8 micro-batches an epoch), past a checkpoint
    run(tmp_path / "b")
    for sub in ("", "ema"):
        a = load_file(tmp_path / "a" / "out" / sub / "model.safetensors")
        b = load_file(tmp_path / "b" / "out" / sub / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_GROUP_SIGNAL_CHILD = """
import os, subprocess, sys
from pathlib import Path
import torch
from ctgen.data import batches
from ctgen.models.classifier3d import Classifier3D, ClassifierConfig
from ctgen.training.loop import TrainConfig, train

class GroupSignalled(Classifier3D):
    def forward(self, video, labels, step=0):
        if step == 2:  # what Slurm does at the time limit: every process of the step, data workers included, from
            # another process (a worker exits quietly on a SIGTERM from its parent)
            subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"])
        return super().forward(video, labels, step)

manifest, root = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(5)
model = GroupSignalled(ClassifierConfig(stem_stride=(1, 2, 2), channels=(4, 8), blocks=(1, 1), norm_groups=2))
make = batches.streamed([manifest], batches.volume_decode([-1000, 1000]), batches.classifier_collate(batches.Augment()))
train(model, make, TrainConfig(max_steps=8, batch_size=2, lr=1e-2, warmup_steps=1, ckpt_every=100, log_every=100,
                               tensorboard=False, num_workers=2, seed=5, device="cpu"),
      root / "out", checkpoint_dir=root / "ckpt")
"""


def test_sigterm_to_the_process_group_spares_the_data_workers(shards, tmp_path):
    """Slurm signals the whole job step: a SIGTERM that also reached the DataLoader's workers killed them, and the
    training failed ("DataLoader worker ... is killed by signal") without its checkpoint instead of exiting 75."""
    import signal
    import subprocess
    import sys

    from ctgen.training import checkpoint as ckpt

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for name in ("SLURM_JOB_ID", "CTGEN_JOB_DEADLINE"):
        env.pop(name, None)
    # a session of its own: the signal to its group must not reach pytest
    res = subprocess.run([sys.executable, "-c", _GROUP_SIGNAL_CHILD, shards["manifest"], str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120, start_new_session=True)
    assert res.returncode == 75, res.stderr[-2000:]
    state = ckpt.load_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 3 and [s["reason"] for s in state["stops"]] == [signal.Signals.SIGTERM.name]


def test_shard_index_is_parsed_once_and_follows_a_rewritten_shard(shards, tmp_path, monkeypatch):
    """Readers of later epochs reuse each shard's member offsets (tar headers are parsed once per process),
    read the same bytes as webdataset, and a shard written anew is indexed anew."""
    import tarfile

    from ctgen.data import stream

    shard_list = load_shards([shards["manifest"]])
    volumes = {key: sample_bytes(s.url, key) for s in shard_list for key in s.keys}
    calls = []
    real_open = tarfile.open
    monkeypatch.setattr(stream.tarfile, "open", lambda *a, **k: calls.append(a[0]) or real_open(*a, **k))
    stream._indexes.clear()
    for _ in range(2):  # two epochs' readers
        reader = stream.ShardReader(tuple(shard_list), verify=False)
        for i, shard in enumerate(shard_list):
            for key in shard.keys:
                sample = reader.read(i, key)
                assert sample["__key__"] == key and sample["prompt.txt"] == f"prompt {key}"
                assert np.array_equal(sample["vol.b2nd"], stream.decode_member("x.b2nd", volumes[key]))
                assert np.all(sample["vol.b2nd"] == _value(key))
        reader.close()
    assert sorted(calls) == sorted(s.url for s in shard_list)  # each shard's headers once
    monkeypatch.undo()
    first = shard_list[0]
    ref = next(iter(wds.WebDataset(first.url, shardshuffle=False)))  # webdataset's own reading of the first sample
    reader = stream.ShardReader((first,), verify=False)
    assert reader.read(0, ref["__key__"])["meta.json"] == stream.decode_member("meta.json", ref["meta.json"])
    # rewrite the shard with one sample fewer: the cached index must not serve the old offsets
    with tarfile.open(first.url) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if not m.name.startswith(first.keys[0] + ".")]
    os.remove(first.url)
    with tarfile.open(first.url, "w") as tf:
        for m, data in members:
            tf.addfile(m, __import__("io").BytesIO(data))
    os.utime(first.url, ns=(1, 1))
    fresh = stream.ShardReader((first,), verify=False)
    with pytest.raises(ShardError, match="not in the shard"):
        fresh.read(0, first.keys[0])
    assert fresh.read(0, first.keys[1])["prompt.txt"] == f"prompt {first.keys[1]}"


def sample_bytes(url: str, key: str) -> bytes:
    """The volume member of ``key`` in the tar at ``url``, read with tarfile (the independent reference)."""
    import tarfile

    with tarfile.open(url) as tf:
        return next(tf.extractfile(m).read() for m in tf.getmembers() if m.name.startswith(key + ".") and
                    m.name.endswith(".b2nd"))
