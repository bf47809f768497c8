"""Plausibility checks on checkpoint inputs, made before anything is allocated in proportion
to a number the input states.

A checkpoint is a set of small files that describe big ones: a 400-byte config.json names the
layer count, a 500-byte pickle names tensor sizes and strides, a directory entry can be a FIFO.
Each check here compares such a claim with what is really present (bytes, tensors, file
types), so that a tiny hostile input costs a tiny amount of time and memory:

- `require_regular_inputs`: every file a checkpoint reader would open is a regular file
  (a FIFO named tokenizer.model would block the open forever; /dev/zero would never end);
- `scan_torch_pickle`: the pickle inside a torch.save zip uses only what a state dict needs
  (no bytearray(2**31), no arbitrary callables), before torch unpickles it;
- `check_tensor_storage`: every tensor's bytes are its own bytes of its storage (dense,
  in bounds, not shared), so an 18 KB file cannot expand into an 800 MB output;
- `check_layer_count` / `check_tensor_names`: the layer count a config states is backed by
  tensors, and no two source names land on one GGUF name or on a layer that does not exist.
"""

from __future__ import annotations

import os
import pickletools
import re
import stat
import zipfile
from pathlib import Path

from ..errors import LlmconvError

# Files a checkpoint reader opens, by name (Meta, Hugging Face, tokenizers).
_INPUT_NAME = re.compile(r".*\.(json|pth|bin|safetensors|model|jinja|txt|tiktoken)$")


def require_regular_file(path: Path) -> None:
    """Refuse a path that exists but is not a regular file (FIFO, device, socket, directory),
    without opening it (opening a FIFO for reading blocks until a writer appears)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # absence is the caller's business (it knows what is optional)
    except OSError as e:
        raise LlmconvError(f"cannot stat: {e.strerror}", file=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise LlmconvError(f"not a regular file ({_kind(st.st_mode)}); refusing to read it", file=path)


def require_regular_inputs(model_dir: Path) -> None:
    """Every entry of a checkpoint directory that a reader could open must be a regular file."""
    try:
        names = sorted(os.listdir(model_dir))
    except OSError as e:
        raise LlmconvError(f"cannot list: {e.strerror}", file=model_dir) from None
    for name in names:
        if _INPUT_NAME.fullmatch(name):
            require_regular_file(model_dir / name)


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return what
    return f"mode {mode:o}"


# ---- torch.save pickles ----------------------------------------------------------------------

# What the pickle of a torch.save'd state dict calls: the dict type, the tensor rebuilders and
# the typed storage classes (named in the persistent ids). Nothing else is needed to rebuild a
# dict of tensors, so nothing else is allowed, whatever torch's own weights_only list accepts.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),  # a Parameter tagged with attributes (Megatron's)
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
}
# Opcodes: those torch.save's pickles (protocol 2, torch's default) are made of, which are also
# the ones torch's weights-only unpickler implements: plain containers, numbers and strings, memo
# traffic, GLOBAL, REDUCE and BUILD (which call an allowed global) and BINPERSID (names a
# storage record). Absent on purpose: BYTEARRAY8/NEXT_BUFFER (big buffers), INST/OBJ/NEWOBJ*/EXT*
# (other ways to call), PERSID (text persistent ids, not written by torch.save).
_ALLOWED_OPCODES = {
    "PROTO",
    "STOP",
    "MARK",
    "EMPTY_DICT",
    "EMPTY_LIST",
    "EMPTY_TUPLE",
    "EMPTY_SET",
    "TUPLE",
    "TUPLE1",
    "TUPLE2",
    "TUPLE3",
    "SETITEM",
    "SETITEMS",
    "APPEND",
    "APPENDS",
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG1",
    "BINFLOAT",
    "SHORT_BINSTRING",
    "BINUNICODE",
    "BINPUT",
    "LONG_BINPUT",
    "BINGET",
    "LONG_BINGET",
    "GLOBAL",
    "REDUCE",
    "BUILD",
    "BINPERSID",
}
# Harmless opcodes of other protocols (4 and 5: FRAME, MEMOIZE, STACK_GLOBAL, ...; text-mode
# protocol 0) that torch's weights-only unpickler does not implement: such a file is refused
# with that reason, not as if it held code.
_TORCH_CANNOT_READ = {
    "FRAME",
    "MEMOIZE",
    "STACK_GLOBAL",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "SHORT_BINBYTES",
    "BINBYTES",
    "BINBYTES8",
    "INT",
    "LONG",
    "FLOAT",
    "STRING",
    "BINSTRING",
    "UNICODE",
    "PUT",
    "GET",
    "POP",
    "POP_MARK",
    "DUP",
    "DICT",
    "LIST",
}
# Globals a newer tensor pickle names for a dtype without a typed storage (uint16/32/64,
# float8_*): llmconv reads bf16, f16 and f32 weights.
_NEWER_TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v3"), ("torch.storage", "UntypedStorage")}
_DTYPE_NAME = re.compile(r"u?int\d+|float\d+(_\w+)?|bfloat16|complex\d+|bool|bits\w+|qu?int\w+")
MAX_PICKLE_BYTES = 64 << 20  # a 70B state dict's data.pkl is well under 1 MiB


def scan_torch_pickle(path: Path) -> None:
    """Read the pickle of a torch.save zip and refuse any opcode or global a state dict does
    not need, without executing anything (pickletools only tokenizes)."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [i for i in zf.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise LlmconvError(f"expected one data.pkl in the archive, found {len(pkl)}", file=path)
            if pkl[0].file_size > MAX_PICKLE_BYTES:
                raise LlmconvError(
                    f"data.pkl is {pkl[0].file_size} bytes; a state dict's is far smaller (limit {MAX_PICKLE_BYTES})",
                    file=path,
                )
            data = zf.read(pkl[0])
    except zipfile.BadZipFile as e:
        raise LlmconvError(f"not a zip archive: {e}", file=path) from None
    check_pickle_ops(data, path)


def check_pickle_ops(data: bytes, path: Path) -> None:
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in _TORCH_CANNOT_READ:
                raise LlmconvError(
                    f"pickle opcode {name} at byte {pos} (from protocol {op.proto}) cannot be read safely: "
                    f"torch's weights-only loader reads the protocol torch.save writes by default (2); "
                    f"re-save the state dict with torch.save's defaults",
                    file=path,
                )
            if name not in _ALLOWED_OPCODES:
                raise LlmconvError(
                    f"refused to load: pickle opcode {name} at byte {pos} is not used by a state dict of tensors",
                    file=path,
                )
            if name == "GLOBAL":
                module, _, qual = str(arg).partition(" ")
                _check_global(module, qual, pos, path)
    except (ValueError, IndexError) as e:  # truncated or malformed opcode stream
        raise LlmconvError(f"malformed pickle in data.pkl: {e}", file=path) from None


def _check_global(module: str, qual: str, pos: int, path: Path) -> None:
    if (module, qual) in _ALLOWED_GLOBALS:
        return
    if (module, qual) in _NEWER_TENSOR_GLOBALS or (module == "torch" and _DTYPE_NAME.fullmatch(qual)):
        raise LlmconvError(
            f"holds tensors of a type llmconv does not read ({module}.{qual} at byte {pos}); "
            f"weights must be bf16, f16 or f32",
            file=path,
        )
    raise LlmconvError(
        f"refused to load: the pickle calls {module}.{qual} (byte {pos}); a state dict of "
        f"tensors needs only tensor rebuilders and storages",
        file=path,
    )


def check_tensor_storage(state: dict, path: Path) -> None:
    """Every tensor must be a dense view of bytes no other tensor uses, inside its storage.
    A stride-0 view (`row.expand(n, dim)`) or many names over one storage would otherwise turn
    a few KB on disk into gigabytes when each tensor is materialized. An exact duplicate of
    another tensor (the same bytes, shape and strides, as torch.save writes tied weights) is
    allowed once."""
    by_storage: dict[int, list[tuple[int, int, str, tuple]]] = {}
    for name, t in state.items():
        size, strides = tuple(t.shape), tuple(t.stride())
        if not _dense(size, strides):
            raise LlmconvError(
                f"tensor of shape {list(size)} has strides {list(strides)}: its elements are not "
                f"distinct bytes of its storage (stride-0 or overlapping view)",
                file=path,
                tensor=name,
            )
        storage = t.untyped_storage()
        itemsize = t.element_size()
        start = t.storage_offset() * itemsize
        end = start + t.numel() * itemsize
        if start < 0 or end > storage.nbytes():
            raise LlmconvError(
                f"tensor bytes [{start}, {end}) lie outside its storage of {storage.nbytes()} bytes",
                file=path,
                tensor=name,
            )
        if t.numel():
            by_storage.setdefault(storage.data_ptr(), []).append((start, end, name, (size, strides, t.dtype)))
    for views in by_storage.values():
        views.sort(key=lambda v: (v[0], v[1]))
        for a, b in zip(views, views[1:]):
            if b[0] < a[1]:
                same = a[:2] == b[:2] and a[3] == b[3]
                repeated = len([v for v in views if v[:2] == a[:2]]) > 2
                if not same or repeated:
                    raise LlmconvError(
                        f"tensor shares storage bytes with {a[2]}: each tensor must have its own bytes",
                        file=path,
                        tensor=b[2],
                    )


def _dense(size: tuple, strides: tuple) -> bool:
    """True when the view touches each element of a contiguous block once: after sorting the
    dims of size > 1 by stride, each stride is the product of the sizes inside it."""
    dims = sorted((st, sz) for sz, st in zip(size, strides) if sz > 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


# ---- layer counts and names --------------------------------------------------------------------

_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")
_BLK = re.compile(r"blk\.(\d+)\.")


def check_layer_count(n_layers: int, names, file: Path, key: str) -> None:
    """A config's layer count must be backed by tensors: refuse it before building anything
    per layer when fewer distinct layers are present (10**9 layers in a 400-byte config.json)."""
    present = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    if n_layers > len(present):
        raise LlmconvError(f"{key} is {n_layers} but the checkpoint has tensors for {len(present)} layers", file=file)


def check_tensor_names(tensors, n_layers: int, file: Path) -> None:
    """No two source tensors may become one GGUF tensor (HF `layers.00` and `layers.0` would
    silently replace each other), and no tensor may belong to a layer past n_layers (llama.cpp
    refuses such a file)."""
    seen: dict[str, str] = {}
    for t in tensors:
        if t.name in seen:
            raise LlmconvError(
                f"both {seen[t.name]} and {t.source_name} map to {t.name}",
                file=t.files[0] if t.files else file,
                tensor=t.source_name,
            )
        seen[t.name] = t.source_name
        m = _BLK.match(t.name)
        if m and int(m.group(1)) >= n_layers:
            raise LlmconvError(
                f"tensor of layer {m.group(1)} but the model has {n_layers} layers (0..{n_layers - 1})",
                file=t.files[0] if t.files else file,
                tensor=t.source_name,
            )


def check_checkpoint_files(model_dir: Path) -> None:
    """Before any reader opens anything: only regular files among the names readers open, and
    added_tokens.json (which gguf-py's SentencePiece loader reads by itself) valid."""
    from ..errors import load_json

    require_regular_inputs(model_dir)
    if (model_dir / "added_tokens.json").is_file():
        load_json(model_dir / "added_tokens.json")
