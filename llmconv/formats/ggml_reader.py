"""Reader for legacy ggml LLaMA files: unversioned ggml, ggmf v1 and ggjt v1-v3.

    g = read_ggml("llama-7b.ggmlv3.q4_0.bin")
    g.magic, g.version, g.hparams.n_embd, g.vocab.tokens[:3], g.tensors[0].name

Layout (little-endian; ggml_writer.py writes the ggjt v3 flavour):

    u32 magic          'ggml' 0x67676d6c | 'ggmf' 0x67676d66 | 'ggjt' 0x67676a74
    u32 version        absent for 'ggml'; 1 for 'ggmf'; 1, 2 or 3 for 'ggjt'
    u32 x 7            n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab x          u32 length, token bytes, f32 score (no score in 'ggml' files)
    until end of file: i32 n_dims, i32 name length, i32 ggml type, i32 dims (innermost first),
                       name, [ggjt: zero padding to a 32-byte file offset], tensor data

Block layouts changed between revisions: ggjt v3 stores q4_0/q4_1/q8_0 with fp16 scales (the
layouts GGUF kept); every earlier revision used f32 scales there (20/24/36 bytes per block)
and ggjt v1 and older a different nibble order. `GGMLTensor.gguf_layout` says whether the
bytes can be read with GGUF's block kernels (always for f32/f16, for everything in ggjt v3).

The file is untrusted: every count and length is checked against the file size before it is
used, and any inconsistency raises a one-line LlmconvError naming the offset. Tensor data is
never read here: `data` is a view into a read-only memory map.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..convert.hparams import meta_ffn_dim
from ..errors import LlmconvError

GGJT_MAGIC = 0x67676A74  # "ggjt" read as a little-endian u32 (on disk: b"tjgg")
MAGICS = {0x67676D6C: "ggml", 0x67676D66: "ggmf", GGJT_MAGIC: "ggjt"}
VERSIONS = {"ggml": (0,), "ggmf": (1,), "ggjt": (1, 2, 3)}  # 0: the unversioned format
GGJT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 512  # llama.cpp's ggjt names are < 64 bytes; anything longer is corruption

# What a ggjt loader does not read from the file but assumes. These are the values of
# ctransformers 0.2.27 and llama.cpp from late July 2023 until GGUF (LLAMA_DEFAULT_RMS_EPS);
# llama.cpp before that used 1e-6, and later loaders took the epsilon as a parameter.
ASSUMED_NORM_EPS = 5e-6
ASSUMED_ROPE_THETA = 10000.0
ASSUMED_CONTEXT = 512  # the default context of those loaders; the file has none

# (weights per block, bytes per block) by ggml type id.
# ggjt v3: the layouts GGUF kept; types that existed before GGUF and were stored in files.
_V3_TYPES = (QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
V3_BLOCKS = {int(t): GGML_QUANT_SIZES[t] for t in _V3_TYPES}
# Before v3: f32 scales for q4_0/q4_1/q8_0; q4_2 (4) and q4_3 (5) were 16-weight blocks
# with fp16 scales, removed in May 2023.
OLD_BLOCKS = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 20),
    3: (32, 24),
    4: (16, 10),
    5: (16, 12),
    6: (32, 22),
    7: (32, 24),
    8: (32, 36),
}
OLD_TYPE_NAMES = {4: "Q4_2", 5: "Q4_3"}


def legacy_magic(first4: bytes) -> str | None:
    """ "ggml", "ggmf" or "ggjt" for the first four bytes of a legacy file, else None."""
    return MAGICS.get(int.from_bytes(first4, "little")) if len(first4) == 4 else None


@dataclass
class GGMLHParams:
    n_vocab: int
    n_embd: int
    n_mult: int
    n_head: int
    n_layer: int
    n_rot: int
    ftype: int  # llama_ftype (0 all f32, 1 mostly f16, 2 q4_0, ...); f16 flag in 'ggml' files
    # Not in the file: what ggjt-era loaders assume (see ASSUMED_*).
    norm_eps: float = ASSUMED_NORM_EPS
    rope_theta: float = ASSUMED_ROPE_THETA

    @property
    def n_head_kv(self) -> int:
        return self.n_head  # no grouped-query attention in these files

    @property
    def n_ff(self) -> int:
        """The feed-forward size the loaders derive: (8*n_embd/3) rounded up to n_mult."""
        return meta_ffn_dim(self.n_embd, self.n_mult)


@dataclass
class GGMLVocab:
    tokens: list[bytes]
    scores: list[float]  # all 0.0 for 'ggml' files, which have none


@dataclass
class GGMLTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: outermost first, shape[-1] is the row length (ne[0])
    offset: int  # absolute file offset of the data
    nbytes: int
    data: np.ndarray  # uint8 view of the data in the file's memory map
    record_offset: int = 0  # where the tensor's record starts
    gguf_layout: bool = True  # the bytes use GGUF's block layout for ggml_type

    @property
    def type_name(self) -> str:
        if self.ggml_type in OLD_TYPE_NAMES:
            return OLD_TYPE_NAMES[self.ggml_type]
        name = QT(self.ggml_type).name
        return name if self.gguf_layout else f"{name} (pre-v3 layout)"

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGMLFile:
    path: Path
    magic: str  # "ggml", "ggmf" or "ggjt"
    version: int  # 0 for the unversioned 'ggml' format
    hparams: GGMLHParams
    vocab: GGMLVocab
    tensors: list[GGMLTensor]
    file_size: int
    alignment: int  # 32 for ggjt (data offsets are multiples of it), else 1
    vocab_offset: int  # where the vocabulary starts
    tensors_offset: int  # where the first tensor record starts
    _mm: np.ndarray | None = field(default=None, repr=False)

    def tensor(self, name: str) -> GGMLTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str, at: int | None = None, tensor: str | None = None) -> NoReturn:
        raise LlmconvError(f"{what} at offset {self.pos if at is None else at}", file=self.path, tensor=tensor)

    def need(self, n: int, what: str, tensor: str | None = None) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated file: {what} needs {n} bytes, {self.size - self.pos} left", tensor=tensor)

    def u32s(self, n: int, what: str, tensor: str | None = None) -> tuple[int, ...]:
        self.need(4 * n, what, tensor)
        out = struct.unpack_from(f"<{n}I", self.buf, self.pos)
        self.pos += 4 * n
        return out

    def i32s(self, n: int, what: str, tensor: str | None = None) -> tuple[int, ...]:
        self.need(4 * n, what, tensor)
        out = struct.unpack_from(f"<{n}i", self.buf, self.pos)
        self.pos += 4 * n
        return out

    def raw(self, n: int, what: str, tensor: str | None = None) -> bytes:
        self.need(n, what, tensor)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out


def read_ggml(path: str | Path) -> GGMLFile:
    """Parse the header, vocabulary and tensor records of a legacy ggml file (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LlmconvError(f"cannot open: {e.strerror}", file=path) from None
    if size < 4:
        raise LlmconvError(f"truncated file: {size} bytes, not even a magic number at offset 0", file=path)
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LlmconvError(f"cannot map the file: {e}", file=path) from None
    buf = memoryview(mm)
    c = _Cursor(buf, size, path)

    (magic_u32,) = c.u32s(1, "magic")
    magic = MAGICS.get(magic_u32)
    if magic is None:
        c.fail(f"not a ggml file: magic {bytes(buf[:4])!r} is none of ggml/ggmf/ggjt", at=0)
    version = 0
    if magic != "ggml":
        (version,) = c.u32s(1, "version")
        if version not in VERSIONS[magic]:
            c.fail(f"unsupported {magic} version {version} (known: {', '.join(map(str, VERSIONS[magic]))})", at=4)

    hp_at = c.pos
    hparams = GGMLHParams(*c.u32s(7, "hyperparameters"))
    for name in ("n_vocab", "n_embd", "n_mult", "n_head"):
        if getattr(hparams, name) == 0:
            c.fail(f"hyperparameter {name} is 0", at=hp_at)
    if hparams.n_embd % hparams.n_head:
        c.fail(f"n_embd {hparams.n_embd} is not a multiple of n_head {hparams.n_head}", at=hp_at)

    vocab_at = c.pos
    vocab = _read_vocab(c, hparams.n_vocab, scored=magic != "ggml")

    tensors_at = c.pos
    blocks = V3_BLOCKS if (magic, version) == ("ggjt", 3) else OLD_BLOCKS
    alignment = GGJT_ALIGNMENT if magic == "ggjt" else 1
    tensors: list[GGMLTensor] = []
    seen: set[str] = set()
    while c.pos < size:
        t = _read_tensor(c, mm, blocks, alignment, magic, version)
        if t.name in seen:
            c.fail("duplicate tensor name", at=t.record_offset, tensor=t.name)
        seen.add(t.name)
        tensors.append(t)
    # every layer has tensors; a file with none at all is a vocabulary-only file (llama.cpp shipped those)
    if tensors and hparams.n_layer > len(tensors):
        c.fail(f"n_layer {hparams.n_layer} but the file holds only {len(tensors)} tensors", at=hp_at + 16)
    return GGMLFile(path, magic, version, hparams, vocab, tensors, size, alignment, vocab_at, tensors_at, mm)


def _read_vocab(c: _Cursor, n_vocab: int, scored: bool) -> GGMLVocab:
    per_token = 8 if scored else 4  # the least a token takes: its length (and score)
    if n_vocab * per_token > c.size - c.pos:
        c.fail(f"n_vocab {n_vocab} needs at least {n_vocab * per_token} bytes, the file has {c.size - c.pos} left")
    tokens: list[bytes] = []
    scores: list[float] = []
    unpack_len = struct.Struct("<I").unpack_from
    unpack_score = struct.Struct("<f").unpack_from
    buf, size = c.buf, c.size
    for i in range(n_vocab):
        at = c.pos
        if at + 4 > size:
            c.fail(f"truncated vocabulary: token {i} of {n_vocab}")
        (n,) = unpack_len(buf, at)
        end = at + 4 + n + (4 if scored else 0)
        if end > size:
            c.fail(f"token {i} claims {n} bytes, only {size - at - 4} left in the file")
        tokens.append(bytes(buf[at + 4 : at + 4 + n]))
        scores.append(unpack_score(buf, at + 4 + n)[0] if scored else 0.0)
        c.pos = end
    return GGMLVocab(tokens, scores)


def _read_tensor(c: _Cursor, mm: np.ndarray, blocks: dict, alignment: int, magic: str, version: int) -> GGMLTensor:
    at = c.pos
    n_dims, name_len, ggml_type = c.i32s(3, "tensor record")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"tensor record with {n_dims} dimensions (1 to {MAX_DIMS} allowed)", at=at)
    if not 1 <= name_len <= MAX_NAME:
        c.fail(f"tensor name length {name_len} (1 to {MAX_NAME} allowed)", at=at + 4)
    dims = c.i32s(n_dims, "tensor dimensions")
    raw_name = c.raw(name_len, "tensor name")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        c.fail(f"tensor name {raw_name[:40]!r} is not UTF-8", at=c.pos - name_len)
    if ggml_type not in blocks:
        known = "ggjt v3" if blocks is V3_BLOCKS else f"{magic} v{version}"
        c.fail(f"ggml type {ggml_type} is not a tensor type of {known} files", at=at + 8, tensor=name)
    if any(d <= 0 for d in dims):
        c.fail(f"dimensions {list(dims)} (each must be at least 1)", at=at + 12, tensor=name)
    block, type_size = blocks[ggml_type]
    if dims[0] % block:
        c.fail(
            f"row length {dims[0]} is not a multiple of the {block}-weight block of type {ggml_type}",
            at=at + 12,
            tensor=name,
        )
    n_rows = 1
    for d in dims[1:]:
        n_rows *= d
    nbytes = n_rows * (dims[0] // block) * type_size  # Python ints: no overflow
    data_at = c.pos + (-c.pos % alignment)
    if data_at + nbytes > c.size:
        c.fail(
            f"tensor data ({nbytes} bytes at offset {data_at}) runs past the end of the file ({c.size} bytes)",
            at=at,
            tensor=name,
        )
    c.pos = data_at + nbytes
    gguf_layout = ggml_type in (0, 1) or (magic, version) == ("ggjt", 3)
    return GGMLTensor(
        name, ggml_type, tuple(reversed(dims)), data_at, nbytes, mm[data_at : data_at + nbytes], at, gguf_layout
    )
