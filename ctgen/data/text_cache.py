"""Frozen text-encoder states, computed once per distinct prompt and stored in one safetensors file.

Layout (no pickle anywhere):

* ``hidden`` (T, C): the valid-token states of every distinct text, trimmed to its mask and
  concatenated (float16 or float32);
* ``offsets`` (N + 1,) int64: text ``i`` owns rows ``offsets[i]:offsets[i + 1]``;
* metadata: ``keys`` (JSON ``{key: text index}``, so duplicate prompts share rows), the encoder
  ``identity``, ``dim``, ``max_length``, ``dtype``, ``truncated`` (distinct texts longer than
  ``max_length`` tokens, cut at whole sentences: ``fit_sentences``) and a ``hash`` of identity + dtype +
  prompts, which lets an unchanged rerun return early.

:class:`EmbeddingCache` reads it lazily through a memory map, so data-loader workers share pages; it checks the
offsets against the states at open and each row it reads for finite values (a damaged file is named, not read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ctprep.errors import first_line
from ctprep.volume import atomic_write
from ctgen.models.text_encoders import TextEncoder, TextEncoding, pad_states

log = logging.getLogger(__name__)

FORMAT = "ctgen.text_cache/1"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


#: how texts over max_length are cut, in the hash: caches cut mid-sentence (before) are remade, not kept
_CUT = "whole sentences"


def _prompts_hash(identity: str, dtype: str, prompts: dict[str, str]) -> str:
    payload = json.dumps([identity, dtype, _CUT, sorted(prompts.items())], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable or partial file: treat as absent
        return None


def encode_prompts(encoder: TextEncoder, prompts: dict[str, str], path: str | os.PathLike, batch_size: int = 32,
                   dtype: str = "float16", if_changed: bool = True) -> Path:
    """Encode every distinct text of ``prompts`` (key -> text) once and write the cache to ``path``.

    With ``if_changed`` an existing file made by the same encoder identity, dtype and prompts is
    kept as it is. Memory: the packed states of all texts are held once before writing
    (sum of token counts x C x 2 or 4 bytes), beside one encode call's padded float32 block.
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    digest = _prompts_hash(encoder.identity, dtype, prompts)
    if if_changed and path.exists():
        meta = _read_metadata(path)
        if meta is not None and meta.get("hash") == digest:
            log.info("%s is up to date (%d prompts); not re-encoding", path, len(prompts))
            return path
    texts = sorted(set(prompts.values()))  # distinct texts, in a fixed order
    index = {text: i for i, text in enumerate(texts)}
    counts = [encoder.count_tokens(t) for t in texts]  # before any cut
    cut = sum(n > encoder.max_length for n in counts)
    if cut:  # CT-RATE findings run to 300+ tokens: their positive findings often lie past 128
        log.warning("%d of %d distinct texts are longer than max_length %d tokens (the longest %d): cut at the last "
                    "whole sentence that fits; raise the encoder's max_length to read them whole",
                    cut, len(texts), encoder.max_length, max(counts))
    # the packed states are filled in place, so held once: torch.cat of kept chunks held them twice (2x the payload
    # at peak: 7 GB of CT-RATE sections -> 14 GB). A cut text keeps at most max_length rows: an upper bound
    bound = sum(min(n, encoder.max_length) for n in counts)
    hidden = torch.empty(bound, encoder.dim, dtype=_DTYPES[dtype])  # (T, C)
    lengths, row = [], 0
    chunk = max(batch_size * 8, 1)  # texts per encode call: bounds the padded (n, L, C) block in memory
    for start in range(0, len(texts), chunk):
        enc = encoder.encode(texts[start:start + chunk], batch_size=batch_size)
        for text, states, mask in zip(texts[start:start + chunk], enc.hidden, enc.mask):  # (L, C), (L,)
            states = states[mask]  # (L_i, C)
            n = states.shape[0]
            if row + n > bound:
                raise RuntimeError(f"{encoder.identity} made more token states than its count_tokens counted")
            hidden[row:row + n] = states
            if not torch.isfinite(hidden[row:row + n]).all():
                raise ValueError(_non_finite(encoder, text, states, dtype))
            row += n
            lengths.append(n)
        del enc
    hidden = hidden[:row]  # a view: written without a copy
    offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)  # (N + 1,)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    metadata = {
        "format": "pt",
        "cache_format": FORMAT,
        "identity": encoder.identity,
        "dim": str(encoder.dim),
        "max_length": str(encoder.max_length),
        "dtype": dtype,
        "truncated": str(cut),
        "hash": digest,
        "keys": json.dumps({key: index[text] for key, text in sorted(prompts.items())}, ensure_ascii=False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file({"hidden": hidden.contiguous(), "offsets": offsets}, p, metadata=metadata))
    log.info("encoded %d distinct texts for %d prompts (%d tokens, %s) -> %s",
             len(texts), len(prompts), hidden.shape[0], dtype, path)
    return path


def _check_layout(offsets: list[int], index: dict[str, int], rows: int, dim: int, want_dim: int) -> None:
    """The offsets cover the states' rows in order, and every key names a text: out-of-range offsets sliced a short
    row, or another text's, without a word."""
    if dim != want_dim:
        raise ValueError(f"states are {dim} wide, its metadata says {want_dim}")
    if not offsets or offsets[0] != 0 or offsets[-1] != rows or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"its offsets do not cover the {rows} rows of states in order")
    if index and not all(0 <= i < len(offsets) - 1 for i in index.values()):
        raise ValueError(f"a key names a text beyond its {len(offsets) - 1}")


def _non_finite(encoder: TextEncoder, text: str, states: torch.Tensor, dtype: str) -> str:
    """Why a text's states are not finite, and what the user can set: the encoder's own precision (a Hugging Face
    encoder's ``dtype``); a cache dtype is not a setting of the jobs (float16 holds any normalised states)."""
    where = f"text encoder {encoder.identity.split(':')[1] if ':' in encoder.identity else encoder.identity}"
    if not torch.isfinite(states).all():
        return (f"{where} gives non-finite states for {text[:60]!r}: run it in float32 (its dtype: float32, "
                "the default, in models.text_encoder or the --encoder config)")
    return (f"{where}: states of {text[:60]!r} reach {states.abs().max().item():.3g}, beyond the {dtype} the cache "
            "is stored in (65504 at most in float16): this encoder's states cannot be cached")


class EmbeddingCache:
    """Read side of :func:`encode_prompts`: ``get(key)`` -> (L_i, C) float32 states, ``batch(keys)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no text-embedding cache at {self.path}: run encode_prompts first")
        self._file = None
        try:
            meta = self._open().metadata() or {}
            if meta.get("cache_format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            self.identity: str = meta["identity"]
            self.dim: int = int(meta["dim"])
            self.max_length: int = int(meta["max_length"])
            self.dtype: str = meta["dtype"]
            # texts cut to max_length when encoded; None: a cache written before the count was kept (still readable)
            self.truncated: int | None = int(meta["truncated"]) if "truncated" in meta else None
            self._index: dict[str, int] = json.loads(meta["keys"])
            self._offsets = self._open().get_tensor("offsets").tolist()
            rows, dim = self._open().get_slice("hidden").get_shape()
            _check_layout(self._offsets, self._index, rows, dim, self.dim)
        except (SafetensorError, OSError, KeyError, ValueError) as err:  # truncated, an HTML page, another file
            first = first_line(err)
            raise ValueError(f"{self.path} is not a readable text cache (truncated, or another file?): {first}; "
                             "re-run embed-prompts / embed-sections") from None

    def _open(self):
        if self._file is None:  # reopened lazily after pickling (data-loader workers)
            self._file = safe_open(str(self.path), framework="pt")
        return self._file

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def _check(self, keys: list[str]) -> None:
        missing = [k for k in keys if k not in self._index]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise KeyError(f"{len(missing)} key(s) not in the text cache {self.path}: {shown}; "
                           "re-run encode_prompts with these prompts")

    def require(self, keys: list[str]) -> None:
        """Every one of a training's ``keys`` is in the cache: checked at its start, where a missing one failed with
        a KeyError traceback at the first batch holding it, maybe hours in. ValueError (one line) otherwise."""
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise ValueError(f"{len(missing)} of the {len(keys)} training keys are not in the text cache {self.path} "
                             f"(e.g. {missing[0]!r}): re-run embed-prompts / embed-sections on the data trained on")

    def get(self, key: str) -> torch.Tensor:
        """States of ``key``'s text, (L_i, C) float32 on CPU."""
        self._check([key])
        i = self._index[key]
        states = self._open().get_slice("hidden")[self._offsets[i]:self._offsets[i + 1]].float()
        if not torch.isfinite(states).all():  # the writer stores finite states only: damaged bytes (one row's check
            # as it is read costs a pass over what was just copied; a whole-file hash would read every row at open)
            raise ValueError(f"the text cache {self.path} holds non-finite states for {key!r} (a damaged file): "
                             "re-run embed-prompts / embed-sections")
        return states

    def batch(self, keys: list[str], pad_to: int | None = None) -> TextEncoding:
        """Right-padded (B, L, C) states and (B, L) mask for ``keys``; L = ``pad_to`` or the longest."""
        self._check(list(keys))
        return pad_states([self.get(k) for k in keys], self.dim, pad_to=pad_to)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}, {len(self)} keys, dim={self.dim}, {self.dtype}, {self.identity!r})"
