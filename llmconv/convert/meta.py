"""Original Meta checkpoints: params.json + consolidated.NN.pth (+ tokenizer.model).

Shards are opened with torch.load(mmap=True, weights_only=True): pickled code never
runs and no tensor data is read until `load(name)` asks for it. The streaming engine
reads rows with pread at each tensor's place in the file (torch_zip.py), not through
the mapping. A model-parallel
tensor is joined from its shards only when it is loaded; which axis to join along is
found from the shard shapes against params.json, not hard-coded (LLaMA 1/2 split the
embedding along dim 1, LLaMA 3 along the vocabulary).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmconvError
from ..formats.rawread import RawTensor, will_need
from ..quantize.floats import widen_into
from .guards import check_tensor_storage, scan_torch_pickle
from .hparams import LlamaHParams
from .meta_params import meta_hparams, read_params, stated_head_dim
from .torch_zip import raw_tensors

SHARD_GLOB = "consolidated.*.pth"
DROPPED = {"rope.freqs"}  # precomputed RoPE table in LLaMA 1 checkpoints; llama.cpp computes its own
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def safe_torch_load(path: Path) -> dict:
    """torch.load that never runs pickled code and never reads past the file's end."""
    _check_zip(path)
    scan_torch_pickle(path)     # before torch unpickles anything: only what a state dict needs
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise LlmconvError(
            "refused to load: the pickle holds code or objects that are not plain tensors "
            f"(weights_only=True said: {_first_line(e)})", file=path) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise LlmconvError(f"not a readable PyTorch checkpoint: {_first_line(e)}", file=path) from None
    if not isinstance(obj, dict):
        raise LlmconvError(f"expected a dict of tensors, found {type(obj).__name__}", file=path)
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise LlmconvError(f"entry {k!r} is not a named tensor", file=path)
    check_tensor_storage(obj, path)
    return obj


def _check_zip(path: Path) -> None:
    """A truncated zip that torch still opens would fault (SIGBUS) when its mmapped data
    is touched, so check every member lies inside the file before torch sees it."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    raise LlmconvError(f"truncated: member {info.filename} ends past the end of the file", file=path)
                if info.compress_type != zipfile.ZIP_STORED:
                    raise LlmconvError(f"member {info.filename} is compressed; not a torch.save file", file=path)
    except zipfile.BadZipFile as e:
        raise LlmconvError(f"not a zip archive (truncated, corrupt, or a legacy pickle): {e}", file=path) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass
class MetaCheckpoint:
    path: Path
    params: dict
    shard_paths: list[Path]
    shards: list[dict]                       # name -> mmapped tensor, one dict per shard
    names: list[str]                         # Meta names present, in file order, rope.freqs dropped
    shapes: dict[str, tuple[int, ...]]       # merged shape of every tensor
    merge_axis: dict[str, int | None]        # None: single shard or replicated 1-D
    raw: list[dict[str, RawTensor] | None] = field(default_factory=list)   # per shard: where each tensor lies
    hparams: LlamaHParams = field(init=False)

    def load(self, name: str) -> torch.Tensor:
        """The whole tensor, joined across shards, in the checkpoint's dtype."""
        parts = [s[name] for s in self.shards]
        axis = self.merge_axis[name]
        if axis is None:
            return parts[0]
        return torch.cat(parts, dim=axis)

    def read_rows(self, name: str, a: int, b: int, out: np.ndarray) -> None:
        """Rows [a, b) of the joined tensor as float32 into out[b - a, cols], straight from
        the shards (no joined copy; a 1-D tensor is one row): with pread where every shard's
        tensors were placed in their files (torch_zip.py), else through torch's mapping."""
        axis = self.merge_axis[name]
        shards = range(len(self.shards)) if axis is not None else range(1)
        placed = all(self.raw[i] is not None for i in shards)
        parts = [self.raw[i][name] if placed else self.shards[i][name] for i in shards]
        if axis == 1:           # columns split: each shard gives every row, a band of columns
            col = 0
            for p in parts:
                width = p.shape[1]
                _read_part(p, a, b, out[:, col:col + width])
                col += width
            return
        first = 0               # rows split (or one part): copy the overlap of each shard
        for p in parts:
            n_rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
            lo, hi = max(a, first), min(b, first + n_rows)
            if lo < hi:
                _read_part(p, lo - first, hi - first, out[lo - a:hi - a])
            first += n_rows

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading tensor `name` from disk now, so a checkpoint that
        is not in the page cache streams in while the tensor before it is converted."""
        for i, s in enumerate(self.shards):
            if self.raw[i] is not None:
                self.raw[i][name].prefetch()
            else:
                t = s[name]
                will_need(t.data_ptr(), t.numel() * t.element_size())

    def source_files(self, name: str) -> list[Path]:
        return list(self.shard_paths) if self.merge_axis[name] is not None else self.shard_paths[:1]


def _read_part(p: RawTensor | torch.Tensor, lo: int, hi: int, dst: np.ndarray) -> None:
    """Rows [lo, hi) of one shard's part into float32 `dst`: pread, or the mapped bytes."""
    if isinstance(p, RawTensor):
        p.read_rows(lo, hi, dst)
    else:
        widen_into(_raw(p).reshape(-1, dst.shape[1])[lo:hi], dst)


def _raw(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a tensor's memory-mapped bytes: bf16 as its uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def open_meta_checkpoint(path: str | Path, ctx: int | None = None) -> MetaCheckpoint:
    path = Path(path)
    params = read_params(path)
    shard_paths = sorted(path.glob(SHARD_GLOB), key=_shard_index)
    if not shard_paths:
        raise LlmconvError(f"no {SHARD_GLOB} files", file=path)
    shards = [safe_torch_load(p) for p in shard_paths]
    _check_shard_count(path, shard_paths, shards, params)

    names = [n for n in shards[0] if n not in DROPPED]
    for p, s in zip(shard_paths[1:], shards[1:]):
        have = {n for n in s if n not in DROPPED}
        missing = [n for n in names if n not in have]
        if missing:
            raise LlmconvError("shard is missing a tensor that shard 0 has", file=p, tensor=missing[0])
        extra = [n for n in have if n not in set(names)]
        if extra:
            raise LlmconvError("shard has a tensor that shard 0 lacks", file=p, tensor=extra[0])

    dim = params["dim"]
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = stated_head_dim(params, path / "params.json") or dim // n_heads
    vocab = params.get("vocab_size", -1)
    known = {  # full (rows, cols) from params.json; None where params.json does not say
        "tok_embeddings.weight": (vocab if vocab > 0 else None, dim),
        "output.weight": (vocab if vocab > 0 else None, dim),
        "attention.wq.weight": (n_heads * head_dim, dim),
        "attention.wk.weight": (n_kv * head_dim, dim),
        "attention.wv.weight": (n_kv * head_dim, dim),
        "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (None, dim),
        "feed_forward.w3.weight": (None, dim),
        "feed_forward.w2.weight": (dim, None),
    }

    shapes: dict[str, tuple[int, ...]] = {}
    axes: dict[str, int | None] = {}
    for name in names:
        parts = [s[name] for s in shards]
        if parts[0].dtype not in _FLOAT_DTYPES:
            raise LlmconvError(f"unsupported dtype {parts[0].dtype}", file=shard_paths[0], tensor=name)
        for p, t in zip(shard_paths, parts):
            if t.dtype != parts[0].dtype:
                raise LlmconvError(f"dtype {t.dtype} differs from shard 0's {parts[0].dtype}", file=p, tensor=name)
        short = re.sub(r"^layers\.\d+\.", "", name)
        axis, shape = _merge_rule(name, [tuple(t.shape) for t in parts], known.get(short), shard_paths)
        if axis is None and len(parts) > 1:
            for p, t in zip(shard_paths[1:], parts[1:]):
                if not torch.equal(t, parts[0]):
                    raise LlmconvError("replicated tensor differs between shards", file=p, tensor=name)
        shapes[name] = shape
        axes[name] = axis

    ckpt = MetaCheckpoint(path, params, shard_paths, shards, names, shapes, axes,
                          [raw_tensors(p, s) for p, s in zip(shard_paths, shards)])
    ckpt.hparams = meta_hparams(params, shapes, path, ctx)
    return ckpt


def _shard_name(like: Path, index: int) -> str:
    """consolidated.NN.pth with as many digits as `like` has (Meta writes two)."""
    digits = len(like.name.split(".")[1])
    return f"consolidated.{index:0{digits}d}.pth"


def _check_shard_count(path: Path, shard_paths: list[Path], shards: list[dict], params: dict) -> None:
    """A shard that did not download: every Meta shard holds an equal slice of attention.wq's
    rows (its output features), so params.json's heads x head_dim over one shard's rows is the
    shard count. Without this a lone consolidated.00.pth of two reads as a model of half the width."""
    wq = shards[0].get("layers.0.attention.wq.weight")
    if wq is None or wq.dim() != 2:
        return
    rows, cols = wq.shape
    n_heads = params["n_heads"]
    head_dim = stated_head_dim(params, path / "params.json") or params["dim"] // n_heads
    full = n_heads * head_dim
    if cols != params["dim"] or rows <= 0 or full % rows or full // rows <= len(shard_paths):
        return      # not a sharding pattern: the shape checks that follow say what is wrong
    n = full // rows
    have = {_shard_index(p) for p in shard_paths}
    raise LlmconvError(f"missing shard: this checkpoint has {n} model-parallel shards (each holds {rows} of "
                       f"attention.wq's {full} rows); {len(shard_paths)} found",
                       file=path / _shard_name(shard_paths[0], min(set(range(n)) - have)))


def _shard_index(p: Path) -> int:
    m = re.match(r"consolidated\.(\d+)\.pth$", p.name)
    return int(m.group(1)) if m else 1 << 30


def _merge_rule(name, shard_shapes, full, shard_paths):
    """(axis, merged shape): which axis the model-parallel shards split `name` along.

    Meta splits evenly; a checkpoint re-sharded with torch.tensor_split is uneven (32000 rows
    over 3 shards: 10667/10667/10666). Either way the axis is the one where the other dimension
    is the same in every shard (and equals params.json's where it says), and the parts add up to
    params.json's size where it says one."""
    first = shard_shapes[0]
    if len(shard_shapes) == 1:
        return None, first
    if len(first) == 1:
        for p, s in zip(shard_paths, shard_shapes):
            if s != first:
                raise LlmconvError(f"1-D tensor has shape {s} here but {first} in shard 0", file=p, tensor=name)
        return None, first
    for p, s in zip(shard_paths, shard_shapes):
        if len(s) != len(first):
            raise LlmconvError(f"shape {s} has another rank than shard 0's {first}", file=p, tensor=name)
    if len(first) != 2:
        raise LlmconvError(f"cannot merge a {len(first)}-D tensor across shards", file=shard_paths[0], tensor=name)
    full = full if full is not None else (None, None)
    fits = [axis for axis in (0, 1) if _splits_along(axis, shard_shapes, full)]
    if len(fits) != 1:
        for axis in (0, 1):     # the split is clear but the parts do not add up to params.json's size
            if not fits and _splits_along(axis, shard_shapes, full[:axis] + (None,) + full[axis + 1:]):
                total = sum(s[axis] for s in shard_shapes)
                raise LlmconvError(f"shards join to {total} along dim {axis} but params.json implies {full[axis]}",
                                   file=shard_paths[0], tensor=name)
        why = "fit no split" if not fits else "fit a split along either dimension"
        raise LlmconvError(f"shard shapes {shard_shapes} {why} of a {tuple(full)} tensor given params.json",
                           file=shard_paths[0], tensor=name)
    axis = fits[0]
    merged = list(first)
    merged[axis] = sum(s[axis] for s in shard_shapes)
    return axis, tuple(merged)


def _splits_along(axis: int, shard_shapes, full) -> bool:
    other = 1 - axis
    others = {s[other] for s in shard_shapes}
    if len(others) != 1 or (full[other] is not None and others != {full[other]}):
        return False
    total = sum(s[axis] for s in shard_shapes)
    return full[axis] is None or total == full[axis]
