"""Original Meta checkpoints: params.json + consolidated.NN.pth (+ tokenizer.model).

Shards are read without torch where they are plain state dicts (torch_pickle.py: where each
tensor lies, its dtype and shape; importing torch would cost more CPU than a 1B q4_0
conversion's start-up otherwise needs), else with torch.load(mmap=True, weights_only=True).
Either way pickled code never runs and no tensor data is read until asked for. The
streaming engine reads rows with pread at each tensor's place in the file (torch_pickle.py,
or torch_zip.py for torch's mapping), not through the mapping. A model-parallel
tensor is joined from its shards only when it is loaded; which axis to join along is
found from the shard shapes against params.json, not hard-coded (LLaMA 1/2 split the
embedding along dim 1, LLaMA 3 along the vocabulary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LlmconvError
from ..formats.rawread import RawTensor, will_need
from ..quantize.floats import widen_into
from .hparams import LlamaHParams
from .meta_params import meta_hparams, read_params, stated_head_dim
from .pth import is_float, mapped_bytes, open_shards, same_values, safe_torch_load

SHARD_GLOB = "consolidated.*.pth"
DROPPED = {"rope.freqs"}  # precomputed RoPE table in LLaMA 1 checkpoints; llama.cpp computes its own


@dataclass
class MetaCheckpoint:
    path: Path
    params: dict
    shard_paths: list[Path]
    names: list[str]  # Meta names present, in file order, rope.freqs dropped
    shapes: dict[str, tuple[int, ...]]  # merged shape of every tensor
    merge_axis: dict[str, int | None]  # None: single shard or replicated 1-D
    raw: list[dict[str, RawTensor] | None] = field(default_factory=list)  # per shard: where each tensor lies
    # per shard: name -> torch's memory-mapped tensor; loaded on first use of `shards` when
    # the shards were read without torch
    _torch_shards: list[dict] | None = None
    hparams: LlamaHParams = field(init=False)

    @property
    def shards(self) -> list[dict]:
        """name -> torch tensor (memory-mapped), one dict per shard: for callers that compute
        with torch (verify, imatrix); the conversion itself reads `raw`."""
        if self._torch_shards is None:
            self._torch_shards = [safe_torch_load(p) for p in self.shard_paths]
        return self._torch_shards

    def _placed(self, shards) -> bool:
        return all(self.raw[i] is not None for i in shards)

    def load(self, name: str):
        """The whole tensor as a torch tensor, joined across shards, in the checkpoint's dtype."""
        import torch

        parts = [s[name] for s in self.shards]
        axis = self.merge_axis[name]
        if axis is None:
            return parts[0]
        return torch.cat(parts, dim=axis)

    def load_f32(self, name: str) -> np.ndarray:
        """The whole tensor as a new float32 array, joined across shards."""
        axis = self.merge_axis[name]
        shards = range(len(self.raw)) if axis is not None else range(1)
        if not self._placed(shards):
            import torch

            return self.load(name).to(torch.float32).numpy()
        parts = [self.raw[i][name].load() for i in shards]
        return parts[0] if axis is None else np.concatenate(parts, axis=axis)

    def dtype_name(self, name: str) -> str:
        """ "bf16", "f16" or "f32": the tensor's storage dtype."""
        if self.raw[0] is not None:
            return self.raw[0][name].dtype
        from .torch_zip import TORCH_DTYPE_NAMES

        t = self.shards[0][name]
        return TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype))

    def read_rows(self, name: str, a: int, b: int, out: np.ndarray) -> None:
        """Rows [a, b) of the joined tensor as float32 into out[b - a, cols], straight from
        the shards (no joined copy; a 1-D tensor is one row): with pread where every shard's
        tensors were placed in their files (torch_zip.py), else through torch's mapping."""
        axis = self.merge_axis[name]
        shards = range(len(self.raw)) if axis is not None else range(1)
        placed = self._placed(shards)
        parts = [self.raw[i][name] if placed else self.shards[i][name] for i in shards]
        if axis == 1:  # columns split: each shard gives every row, a band of columns
            col = 0
            for p in parts:
                width = p.shape[1]
                _read_part(p, a, b, out[:, col : col + width])
                col += width
            return
        first = 0  # rows split (or one part): copy the overlap of each shard
        for p in parts:
            n_rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
            lo, hi = max(a, first), min(b, first + n_rows)
            if lo < hi:
                _read_part(p, lo - first, hi - first, out[lo - a : hi - a])
            first += n_rows

    def rows_reader(self, name: str):
        """The engine's read_rows for `name`: the shard's own RawTensor.read_rows when the tensor
        is one part stored as it is (the engine then knows it may copy the bytes verbatim,
        stream.verbatim_source), else `read_rows` joining the parts."""
        if self.merge_axis[name] is None and self.raw[0] is not None:
            return self.raw[0][name].read_rows
        return lambda a, b, out: self.read_rows(name, a, b, out)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading tensor `name` from disk now, so a checkpoint that
        is not in the page cache streams in while the tensor before it is converted."""
        for i, raw in enumerate(self.raw):
            if raw is not None:
                raw[name].prefetch()
            else:
                t = self.shards[i][name]
                will_need(t.data_ptr(), t.numel() * t.element_size())

    def source_files(self, name: str) -> list[Path]:
        return list(self.shard_paths) if self.merge_axis[name] is not None else self.shard_paths[:1]


def _read_part(p, lo: int, hi: int, dst: np.ndarray) -> None:
    """Rows [lo, hi) of one shard's part into float32 `dst`: pread, or the mapped bytes."""
    if isinstance(p, RawTensor):
        p.read_rows(lo, hi, dst)
    else:
        widen_into(mapped_bytes(p).reshape(-1, dst.shape[1])[lo:hi], dst)


def open_meta_checkpoint(path: str | Path, ctx: int | None = None) -> MetaCheckpoint:
    path = Path(path)
    params = read_params(path)
    shard_paths = sorted(path.glob(SHARD_GLOB), key=_shard_index)
    if not shard_paths:
        raise LlmconvError(f"no {SHARD_GLOB} files", file=path)
    raws, torch_shards = open_shards(shard_paths)
    shards = torch_shards if torch_shards is not None else raws
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
        if not is_float(parts[0]):
            raise LlmconvError(f"unsupported dtype {parts[0].dtype}", file=shard_paths[0], tensor=name)
        for p, t in zip(shard_paths, parts):
            if t.dtype != parts[0].dtype:
                raise LlmconvError(f"dtype {t.dtype} differs from shard 0's {parts[0].dtype}", file=p, tensor=name)
        short = re.sub(r"^layers\.\d+\.", "", name)
        axis, shape = _merge_rule(name, [tuple(t.shape) for t in parts], known.get(short), shard_paths)
        if axis is None and len(parts) > 1:
            for p, t in zip(shard_paths[1:], parts[1:]):
                if not same_values(t, parts[0]):
                    raise LlmconvError("replicated tensor differs between shards", file=p, tensor=name)
        shapes[name] = shape
        axes[name] = axis

    ckpt = MetaCheckpoint(path, params, shard_paths, names, shapes, axes, raws, torch_shards)
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
    if wq is None or len(wq.shape) != 2:
        return
    rows, cols = wq.shape
    n_heads = params["n_heads"]
    head_dim = stated_head_dim(params, path / "params.json") or params["dim"] // n_heads
    full = n_heads * head_dim
    if cols != params["dim"] or rows <= 0 or full % rows or full // rows <= len(shard_paths):
        return  # not a sharding pattern: the shape checks that follow say what is wrong
    n = full // rows
    have = {_shard_index(p) for p in shard_paths}
    raise LlmconvError(
        f"missing shard: this checkpoint has {n} model-parallel shards (each holds {rows} of "
        f"attention.wq's {full} rows); {len(shard_paths)} found",
        file=path / _shard_name(shard_paths[0], min(set(range(n)) - have)),
    )


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
        for axis in (0, 1):  # the split is clear but the parts do not add up to params.json's size
            if not fits and _splits_along(axis, shard_shapes, full[:axis] + (None,) + full[axis + 1 :]):
                total = sum(s[axis] for s in shard_shapes)
                raise LlmconvError(
                    f"shards join to {total} along dim {axis} but params.json implies {full[axis]}",
                    file=shard_paths[0],
                    tensor=name,
                )
        why = "fit no split" if not fits else "fit a split along either dimension"
        raise LlmconvError(
            f"shard shapes {shard_shapes} {why} of a {tuple(full)} tensor given params.json",
            file=shard_paths[0],
            tensor=name,
        )
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
