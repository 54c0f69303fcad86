"""Streaming training data from webdataset shards: planned, resumable, the same number of steps on every rank.

What a training job sees, per epoch ``e``:

1. the shard list of the manifests, shuffled with ``(seed, e, pass)``;
2. split over ranks with webdataset's ``split_by_node``, then over the DataLoader's workers with its
   ``split_by_worker`` (both run inside the worker, on the same shuffled list);
3. each worker's samples in shard order through a seeded shuffle buffer of ``buffer`` samples;
4. batches: global micro-batch ``j`` of the epoch comes from worker ``j % num_workers``; the main
   process puts batches back in ``j`` order, so the sequence does not depend on which worker is faster.

An epoch is ``total_samples // (world_size * batch_size)`` micro-batches on every rank (webdataset's
``with_epoch`` idea): a rank whose shards run out starts another pass over them, so DDP never waits
for a rank with nothing left. Shards are dealt so that every worker slot holds about as many samples
(``StreamPlan.slot_shards``); what is left of the imbalance (at most about one shard per slot) is read
twice in that epoch or not at all: 0.1% of 50k samples in 64-sample shards on 8 ranks or 8 workers,
1.1% on 8 ranks x 8 workers (3.1% when shards were dealt at random). One process with no workers reads
every sample exactly once per epoch. Every choice above is a function of (manifests, seed, epoch, rank,
world size, workers, batch size, buffer) alone, computed from the manifests' key lists without
reading any volume. That is what makes resuming cheap and exact: a run resumed at micro-batch ``s``
skips the keys of the first ``s`` batches (no decoding, no reading) and then reads exactly the
samples an uninterrupted run would have read, with 0 workers and with workers alike, as long as
the world size and the worker count are the same (with other counts the epoch is re-planned).

Why not webdataset's own ``shuffle`` stage and ``tarfile_to_samples``: a webdataset pipeline has no
state to save, so resuming means re-reading (and its shuffle buffer holding) decoded volumes; here
the shuffle buffer holds keys, a worker holds one batch, and samples are read from their shard by
offset (``tarfile`` index of member headers), so peak memory is a few batches per worker (the one it
builds and the ``PREFETCH`` it keeps ready), whatever the cohort. Shards are checked against their manifest before use: size at start (``preflight``), sha256
before a shard's first sample of the run is read, whichever epoch and worker reads it (``verify``; each shard once
per run: the workers report what they hashed with their batches); a mismatch or a failing read names the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import re
import signal
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import torch
import webdataset as wds

from ctgen.data.derived import is_derived, load_derived
from ctprep.codec import decode_volume
from ctprep.shards import ShardError, load_manifest

log = logging.getLogger(__name__)

#: micro-batches each data worker keeps ready ahead of the training step (the DataLoader's prefetch_factor): a rank
#: holds up to (PREFETCH + 1) x workers decoded batches (plus their pinned copies on a GPU)
PREFETCH = 2
OPEN_SHARDS = 4  # shard files a reader keeps open (the shuffle buffer spans a few consecutive shards)
#: Shard indexes (member offsets) a process keeps between readers and epochs. Parsing a tar's headers
#: (``tarfile.getmembers``) costs ~3 ms per shard, and each epoch's readers and a shuffle buffer that
#: spans more shards than are open would otherwise parse them again and again: with the demo's
#: 4-sample shards that was half of a training job's data time. An entry is a few hundred bytes a sample.
INDEX_CACHE = 256
_indexes: OrderedDict[tuple[str, int, int], dict[str, dict[str, tuple[str, int, int]]]] = OrderedDict()


def shard_index(url: str) -> dict[str, dict[str, tuple[str, int, int]]]:
    """{key: {extension: (member name, data offset, size)}} of an uncompressed tar shard, cached per
    process by (path, mtime, size), so a rewritten shard is indexed afresh."""
    st = os.stat(url)
    ident = (os.fspath(url), st.st_mtime_ns, st.st_size)
    if ident in _indexes:
        _indexes.move_to_end(ident)
        return _indexes[ident]
    index: dict[str, dict[str, tuple[str, int, int]]] = {}
    with tarfile.open(url, "r:") as tf:  # headers are 512 B each, read in order
        for member in tf.getmembers():
            key, _, ext = member.name.partition(".")
            index.setdefault(key, {})[ext] = (member.name, member.offset_data, member.size)
    _indexes[ident] = index
    if len(_indexes) > INDEX_CACHE:
        _indexes.popitem(last=False)
    return index


@dataclass(frozen=True)
class Shard:
    """One tar shard as its manifest describes it."""

    url: str  # absolute path
    keys: tuple[str, ...]  # sample keys, in tar order
    sha256: str
    bytes: int
    manifest: str  # the manifest that lists it (for messages)
    source_sha256: str | None = None  # a derived shard's: the sha256 of the volume shard it was computed from

    @property
    def origin(self) -> str:
        """The sha256 of the volume shard this one holds or was derived from."""
        return self.source_sha256 or self.sha256


def load_shards(manifests: list[str | os.PathLike]) -> list[Shard]:
    """The shards of ``manifests`` (volume shards, or derived ones), in manifest order (the plan's starting point).

    A shard or a key listed twice is refused: the same manifest given twice (or by another spelling of its path),
    or a chunk's manifest beside the merged one, read every sample of it twice an epoch, without a word.
    """
    shards = []
    by_path: dict[str, str] = {}  # resolved shard path -> the manifest listing it
    by_key: dict[str, str] = {}  # key -> its shard
    for manifest in manifests:
        path = Path(manifest)
        meta = load_derived(path) if is_derived(path) else load_manifest(path)
        for s in meta["shards"]:
            url = str((path.parent / s["file"]).resolve())
            if url in by_path:
                raise ShardError(f"{url} is in more than one shard manifest ({by_path[url]} and {path}; the same "
                                 "manifest twice, or a chunk's manifest beside the merged one): give each manifest once")
            by_path[url] = str(path)
            for key in s["keys"]:
                if key in by_key:
                    raise ShardError(f"key {key} is in more than one shard manifest ({by_key[key]} and {url}): give "
                                     "each sample once")
                by_key[key] = url
            shards.append(Shard(url, tuple(s["keys"]), s["sha256"], int(s["bytes"]), str(path), s.get("source_sha256")))
    return shards


def preflight(shards: list[Shard]) -> None:
    """Every shard exists with its manifest's size: a missing or truncated shard is named before training."""
    for s in shards:
        if not os.path.isfile(s.url):
            raise ShardError(f"{s.url} (listed in {s.manifest}) is missing")
        size = os.path.getsize(s.url)
        if size != s.bytes:
            raise ShardError(f"{s.url} has {size} bytes but {s.manifest} says {s.bytes}: re-create the shards")


def verify_shard(shard: Shard) -> None:
    """sha256 of the whole file against the manifest; raises :class:`ShardError` naming the shard."""
    digest = hashlib.sha256()
    with open(shard.url, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != shard.sha256:
        raise ShardError(f"{shard.url} does not match its checksum in {shard.manifest}: the file changed after "
                         "it was written (re-create the shards, or restore the file)")


def _mixed_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] & (2**63 - 1))


@dataclass(frozen=True)
class StreamPlan:
    """Which sample keys go into which micro-batch: a pure function of the manifests and the settings."""

    shards: tuple[Shard, ...]
    batch_size: int  # samples per micro-batch
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0  # DataLoader workers (0: the main process reads)
    buffer: int = 16  # sample shuffle buffer (keys only: costs no memory worth counting)
    parallel: tuple[tuple[Shard, ...], ...] = ()  # shard sets derived from ``shards`` (same keys per shard), read alongside

    def __post_init__(self):
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad plan: batch_size={self.batch_size}, rank {self.rank} of {self.world_size}")
        if not self.total_samples:
            raise ValueError("the shards hold no samples: an empty split")
        if len(self.shards) < self.world_size * self.slots:
            smaller = f"write smaller shards (shards.shard_size at most {max(self.total_samples // (self.world_size * self.slots), 1)})"
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {self.slots} data workers: "
                             f"lower the workers, or {smaller}" if self.num_workers > 0 else
                             f"{len(self.shards)} shards cannot feed {self.world_size} ranks (each reads shards of its "
                             f"own): {smaller}, or use fewer ranks")
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.total_samples} samples cannot fill one global batch of "
                             f"{self.world_size * self.batch_size} (batch {self.batch_size} x {self.world_size} ranks)")

    @property
    def slots(self) -> int:
        """Data streams per rank: one per worker, or one for the main process."""
        return max(self.num_workers, 1)

    @property
    def total_samples(self) -> int:
        return sum(len(s.keys) for s in self.shards)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch, the same on every rank."""
        return self.total_samples // (self.world_size * self.batch_size)

    @staticmethod
    def max_workers(n_shards: int, world_size: int, wanted: int) -> int:
        """The most workers (<= ``wanted``) for which every worker of every rank has at least one shard."""
        return max(0, min(wanted, n_shards // world_size))

    def slot_shards(self, epoch: int, pass_: int, slot: int) -> list[int]:
        """Shard indices of one worker slot for one pass: shuffled, then webdataset's node and worker split.

        With several slots (ranks x workers) the shuffled list is first put in the order that makes the splitters'
        round-robin deal every slot about as many samples: largest shards first (ties in shuffled order), every
        other round of ``slots`` shards reversed (a snake draft). Each slot makes the same number of micro-batches,
        so a slot with fewer samples than that would read some twice and one with more would leave some unread in
        the epoch; a chunk's last shard is short, and dealt at random such slots differed by a few percent
        (1-3% of an epoch read twice at CT-RATE's size). The slot then reads its shards in a shuffled order.
        """
        order = list(range(len(self.shards)))
        rng = random.Random(_mixed_seed(self.seed, epoch, pass_))
        rng.shuffle(order)
        streams = self.world_size * self.slots
        if streams > 1:
            order.sort(key=lambda i: -len(self.shards[i].keys))  # stable: equal sizes stay shuffled
            rounds = [order[r:r + streams] for r in range(0, len(order), streams)]
            order = [i for r, block in enumerate(rounds) for i in (block[::-1] if r % 2 else block)]
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
               "WORKER": str(slot), "NUM_WORKERS": str(self.slots)}
        with _environ(env):  # webdataset's splitters read the rank and worker from these variables first
            mine = list(wds.split_by_worker(wds.split_by_node(order)))
        if streams > 1:
            random.Random(_mixed_seed(self.seed, epoch, pass_, self.rank, slot)).shuffle(mine)
        return mine

    def slot_keys(self, epoch: int, slot: int) -> Iterator[tuple[int, str]]:
        """(shard index, key) in the order one worker slot reads them: endless passes, shuffle buffer applied."""
        rng = random.Random(_mixed_seed(self.seed, epoch, self.rank, slot, 1))
        pass_ = 0
        while True:
            buffer: list[tuple[int, str]] = []
            seen = 0
            for i in self.slot_shards(epoch, pass_, slot):
                for key in self.shards[i].keys:
                    seen += 1
                    if len(buffer) < self.buffer:
                        buffer.append((i, key))
                        continue
                    k = rng.randrange(len(buffer))  # webdataset's shuffle: a random buffered sample out, the new one in
                    buffer[k], item = (i, key), buffer[k]
                    yield item
            if not seen:
                raise ShardError(f"rank {self.rank}, data worker {slot}: its shards hold no samples")
            # the pass ends with what its buffer still holds (as webdataset's shuffle empties its buffer at the end
            # of its input): one pass reads every sample of the slot's shards once, none from the next pass early
            rng.shuffle(buffer)
            yield from buffer
            pass_ += 1

    def batches_of_slot(self, slot: int, start: int = 0) -> range:
        """The epoch's micro-batch indices ``j >= start`` that ``slot`` produces (j % slots == slot)."""
        first = start + (slot - start) % self.slots
        return range(first, self.steps_per_epoch, self.slots)

    def slot_batches(self, epoch: int, slot: int, start: int = 0) -> Iterator[tuple[int, list[tuple[int, str]]]]:
        """(j, [(shard index, key)] * batch_size) for the slot's micro-batches from ``start`` on."""
        keys = self.slot_keys(epoch, slot)
        skip = len(range(slot, start, self.slots)) * self.batch_size  # the slot's batches before start: keys only
        for _ in range(skip):
            next(keys)
        for j in self.batches_of_slot(slot, start):
            yield j, [next(keys) for _ in range(self.batch_size)]

    def batch_keys(self, epoch: int, j: int) -> list[tuple[int, str]]:
        """The (shard, key) list of micro-batch ``j`` (for messages and tests)."""
        for _, items in self.slot_batches(epoch, j % self.slots, start=j):
            return items
        raise IndexError(f"micro-batch {j} is past the epoch's {self.steps_per_epoch}")


class _environ:
    """Set environment variables for a block, then restore them (the worker's own process only)."""

    def __init__(self, values: dict[str, str]):
        self.values, self.saved = values, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- reading ---------------------------------------------------------------------------------------


def decode_member(name: str, data: bytes) -> Any:
    """One tar member by its extension; only the shard format's types (never pickle)."""
    if name.endswith(".b2nd"):  # the volume: a lossless blosc2 frame (ctprep.codec)
        return decode_volume(data)
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if name.endswith(".json"):
        return json.loads(data)
    if name.endswith(".txt"):
        return data.decode("utf-8")
    raise ShardError(f"unknown shard member type {name!r}")


#: a shard file as hashed: (path, mtime_ns, size); a file rewritten since is hashed again
FileIdent = tuple[str, int, int]


class ShardReader:
    """Random access to samples of shards by key, through each shard's index of member offsets.

    With ``verify``, a shard is hashed when first opened unless ``verified`` (what this run hashed before, in
    other epochs or readers) holds it; ``hashed`` lists what this reader hashed, for the caller to pass on.
    """

    def __init__(self, shards: tuple[Shard, ...], verify: bool = True, verified: frozenset[FileIdent] = frozenset()):
        self.shards, self.verify = shards, verify
        self._open: OrderedDict[int, tuple[Any, dict[str, dict[str, tuple[str, int, int]]]]] = OrderedDict()
        self._verified: set[FileIdent] = set(verified)
        self.hashed: list[FileIdent] = []

    def _index(self, i: int):
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        shard = self.shards[i]
        fh = open(shard.url, "rb")
        if self.verify:
            st = os.fstat(fh.fileno())
            ident = (shard.url, st.st_mtime_ns, st.st_size)
            if ident not in self._verified:
                try:
                    verify_shard(shard)
                except BaseException:
                    fh.close()
                    raise
                self._verified.add(ident)
                self.hashed.append(ident)
        entry = (fh, shard_index(shard.url))
        self._open[i] = entry
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1][0].close()
        return entry

    def read(self, i: int, key: str, only: str | None = None) -> dict[str, Any]:
        """The sample ``key`` of shard ``i`` as {"__key__", "__url__", extension: decoded value}; with ``only``, that
        member alone (where the sample has it)."""
        shard = self.shards[i]
        try:
            fh, index = self._index(i)
            if key not in index:
                raise ShardError(f"{shard.url}: key {key!r} is listed in {shard.manifest} but not in the shard")
            sample = {"__key__": key, "__url__": shard.url}
            members = index[key] if only is None else {only: index[key][only]} if only in index[key] else {}
            for ext, (name, offset, size) in members.items():
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise ShardError(f"{shard.url}: member {name!r} is truncated ({len(data)} of {size} bytes)")
                sample[ext] = decode_member(name, data)
            return sample
        except ShardError:
            raise
        except Exception as err:  # a read or decode failure of real data: say which shard and sample
            raise ShardError(f"{shard.url}: reading sample {key!r} failed: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        for fh, _ in self._open.values():
            fh.close()
        self._open.clear()


def member_values(shards: list[Shard], name: str, verify: bool = True) -> Iterator[tuple[str, Any]]:
    """(key, decoded member ``name``) of every sample that has it, in manifest order, checksums verified: each shard
    is hashed once (the whole file: a flipped byte in a label read back as 255, unknown), then only that member is
    read, by offset. A failing read raises :class:`ShardError` naming the shard and the sample.

    ``verify=False`` reads the member alone: for a job that streams the same shards afterwards and hashes each before
    reading it (a classifier's label counts, a resize preset's spacings of the training split), where hashing here
    would read the whole split (~1.7 TB at CT-RATE) before the first step for a few hundred bytes a sample."""
    reader = ShardReader(tuple(shards), verify=verify)
    try:
        for i, shard in enumerate(shards):
            for key in shard.keys:
                sample = reader.read(i, key, only=name)
                if name in sample:
                    yield key, sample[name]
    finally:
        reader.close()


def iter_raw_samples(manifests: str | os.PathLike | list, keys: set[str] | None = None
                     ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, raw sample) of one manifest or a list of them in manifest order, checksums verified; only the
    samples of ``keys`` where given (the others' bytes are never read)."""
    shards = tuple(load_shards([str(m) for m in manifests] if isinstance(manifests, list) else [manifests]))
    reader = ShardReader(shards, verify=True)
    try:
        for i, shard in enumerate(shards):
            for key in shard.keys:
                if keys is None or key in keys:
                    yield key, reader.read(i, key)
    finally:
        reader.close()


def raw_batches(manifest: str | os.PathLike, batch_size: int, desc: str) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """:func:`iter_raw_samples` in lists of ``batch_size`` (the last may be shorter), with a progress bar:
    what a chunk job (encode-tokens, encode-latents) feeds its network."""
    from ctprep.logs import progress

    bar = progress(desc=desc, unit="vol")
    pending: list[tuple[str, dict[str, Any]]] = []
    for item in iter_raw_samples(manifest):
        pending.append(item)
        if len(pending) == batch_size:
            yield pending
            bar.update(len(pending))
            pending = []
    if pending:
        yield pending
        bar.update(len(pending))
    bar.close()


def _merged(readers: list[ShardReader], i: int, key: str) -> dict[str, Any]:
    """The sample from the main shard set, with the members of the parallel sets added (the main set wins)."""
    sample = readers[0].read(i, key)
    for reader in readers[1:]:
        for name, value in reader.read(i, key).items():
            sample.setdefault(name, value)
    return sample


# --- the DataLoader side -----------------------------------------------------------------------------

Decode = Callable[[dict[str, Any]], dict[str, Any]]  # raw sample -> model-ready sample
Collate = Callable[[list[dict[str, Any]], torch.Generator], dict[str, Any]]  # samples + batch rng -> batch


class PlannedBatches(torch.utils.data.IterableDataset):
    """One epoch of one rank from micro-batch ``start``: yields (j, batch, shard files hashed) from each worker's slot."""

    def __init__(self, plan: StreamPlan, epoch: int, start: int, decode: Decode, collate: Collate, verify: bool = True,
                 verified: frozenset[FileIdent] = frozenset()):
        super().__init__()
        self.plan, self.epoch, self.start = plan, epoch, start
        self.decode, self.collate, self.verify, self.verified = decode, collate, verify, verified

    def __iter__(self):
        """(j, batch, shard files hashed to make it): a forked worker's own record of what it hashed ends with
        it, so the files go back with the batches, and the next epoch's workers skip them."""
        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # workers decode; the main process's threads do the maths
            blosc2.set_nthreads(1)  # one decoding thread per worker: the workers are the parallelism
        readers = [ShardReader(s, verify=self.verify, verified=self.verified)
                   for s in (self.plan.shards, *self.plan.parallel)]
        try:
            for j, items in self.plan.slot_batches(self.epoch, slot, self.start):
                samples = [self.decode(_merged(readers, i, key)) for i, key in items]
                gen = torch.Generator().manual_seed(_mixed_seed(self.plan.seed, self.epoch, self.plan.rank, j, 2))
                hashed = [ident for reader in readers for ident in reader.hashed]
                for reader in readers:
                    reader.hashed.clear()
                yield j, self.collate(samples, gen), hashed
        finally:
            for reader in readers:
                reader.close()


def _worker_message(err: Exception) -> str:
    """The exception's own message from the text PyTorch gives an exception re-raised from a data worker ("Caught
    ValueError in DataLoader worker process 0. Original Traceback ... ctprep.shards.ShardError: <message>")."""
    text = str(err).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return re.sub(r"^[\w.]*(Error|Exception)\w*: ", "", last)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A data worker's ``worker_init_fn``: SIGTERM and SIGUSR1 are the training process's to handle. Slurm sends them
    to every process of the job step (time limit, pre-emption, scancel); a worker they killed made the main process
    fail with "DataLoader worker ... is killed by signal: Terminated" instead of checkpointing and exiting 75
    (``ctgen.training.loop``). A worker still ends with its loader, and by itself when the main process is gone
    (PyTorch's workers watch their parent); SIGKILL still kills it. Module-level, so a spawned worker can unpickle it."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def epoch_batches(plan: StreamPlan, epoch: int, start: int, decode: Decode, collate: Collate, *,
                  pin_memory: bool = False, verify: bool = True, verified: set[FileIdent] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """The rank's micro-batches of ``epoch`` from ``start``, in order, read by ``plan.num_workers`` workers.

    With ``verify``, each shard is hashed before its first sample is read, unless ``verified`` holds it (the shard
    files this run hashed in earlier epochs); the files hashed in this epoch are added to ``verified`` as their
    batches arrive.
    """
    verified = set() if verified is None else verified
    dataset = PlannedBatches(plan, epoch, start, decode, collate, verify, frozenset(verified))
    if plan.num_workers == 0:
        for _, batch, hashed in dataset:
            verified.update(hashed)
            yield batch
        return
    # the loader's own generator: by default a DataLoader iterator draws its workers' base seed from the
    # global torch RNG when it starts (lazily, at the first batch), which shifted the training's random
    # stream by one draw in a resumed run (found by the Slurm time-limit test); the workers do not use it
    base = torch.Generator().manual_seed(_mixed_seed(plan.seed, epoch, plan.rank, 3))
    # forked workers: the decode and collate steps are closures, which a spawned or forkserver worker (macOS's and
    # Python 3.14's default start method, and the default inside processes torch.multiprocessing.spawn started)
    # cannot unpickle
    context = "fork" if "fork" in mp.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=plan.num_workers, generator=base,
                                         pin_memory=pin_memory, prefetch_factor=PREFETCH, persistent_workers=False,
                                         multiprocessing_context=context, worker_init_fn=ignore_stop_signals)
    pending: dict[int, dict] = {}
    want = start
    it = iter(loader)
    while want < plan.steps_per_epoch:
        if want in pending:
            yield pending.pop(want)
            want += 1
            continue
        try:
            j, batch, hashed = next(it)
        except StopIteration:
            raise RuntimeError(f"the data workers stopped before micro-batch {want} of {plan.steps_per_epoch}") from None
        except ValueError as err:
            # a bad shard or a user's mistake (ShardError, UserError: ValueErrors) raised in a worker: PyTorch re-raises
            # it with the worker's traceback as its text; its own one-line message is the last line
            raise type(err)(_worker_message(err)) from err
        except Exception as err:  # a worker died (killed, out of memory): name what it was reading
            shards = sorted({plan.shards[i].url for jj in range(want, min(want + plan.slots, plan.steps_per_epoch))
                             for i, _ in plan.batch_keys(epoch, jj)})
            raise RuntimeError(f"a data worker failed while preparing micro-batches {want}.. of epoch {epoch}, which "
                               f"read {', '.join(shards)}: {err}") from err
        verified.update(map(tuple, hashed))  # the loader hands tuples over as lists
        pending[j] = batch
