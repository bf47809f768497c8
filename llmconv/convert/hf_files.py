"""Where a Hugging Face (or Mistral) checkpoint keeps its weights: one file, or shards listed by an
index file, or shards named -0000k-of-0000N. `safe_open` checks each safetensors header; the
streaming engine then reads rows with pread at the offsets the header gives (formats/rawread.py;
.bin zips: torch_zip.py), `get` remains for whole-tensor users. Also the JSON reader the HF
modules share."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LlmconvError, load_json
from ..formats.rawread import RawTensor, SourceFile

if TYPE_CHECKING:
    import torch  # `get` returns torch tensors; importing torch at run time costs ~1.4 s of CPU

_ST_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}


def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise LlmconvError(f"{path.name} is missing", file=path.parent)
        return None
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise LlmconvError("expected a JSON object", file=path)
    return obj


@dataclass
class WeightEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # "bf16", "f16", "f32"
    get: Callable[[], torch.Tensor]
    raw: RawTensor | None = None  # where its bytes lie, for pread (None: only `get`)
    # t[i] alone, read without the rest (a safetensors slice): one expert of a fused MoE tensor
    get_expert: Callable[[int], torch.Tensor] | None = None


# File layouts: "safetensors" and "bin" are Hugging Face's, "consolidated" is Mistral's own
# (consolidated.safetensors, or consolidated-0000k-of-0000N.safetensors: split by tensor, not model-parallel).
_SHARD_RE = {
    "safetensors": re.compile(r"model-(\d+)-of-(\d+)\.safetensors"),
    "bin": re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin"),
    "consolidated": re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors"),
}
_SINGLE = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "consolidated": "consolidated.safetensors"}
_INDEX = {
    "safetensors": "model.safetensors.index.json",
    "bin": "pytorch_model.bin.index.json",
    "consolidated": "consolidated.safetensors.index.json",
}


def _shards_on_disk(model_dir: Path, kind: str) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if _SHARD_RE[kind].fullmatch(p.name))


def find_weight_files(
    model_dir: Path, kinds: tuple[str, ...] = ("safetensors", "bin")
) -> tuple[str, list[Path], dict[str, str] | None, Path | None]:
    """(kind, files, weight_map or None, index path or None). safetensors first, like transformers."""
    for kind in kinds:
        index = model_dir / _INDEX[kind]
        if index.is_file():
            doc = read_json(index)
            wmap = doc.get("weight_map")
            if (
                not isinstance(wmap, dict)
                or not wmap
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items())
            ):
                raise LlmconvError("no 'weight_map' of tensor name -> file name", file=index)
            names = list(dict.fromkeys(wmap.values()))
            for fname in names:
                if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
                    raise LlmconvError(f"weight_map names file {fname!r} outside the checkpoint directory", file=index)
                if not (model_dir / fname).is_file():
                    raise LlmconvError(f"{index.name} lists {fname} but that file is missing", file=model_dir / fname)
            for p in _shards_on_disk(model_dir, kind):
                if p.name not in names:
                    raise LlmconvError(f"shard is not listed in {index.name}: its tensors would be dropped", file=p)
            return kind, sorted((model_dir / f for f in names), key=_shard_key), wmap, index
        single = model_dir / _SINGLE[kind]
        if single.is_file():
            return kind, [single], None, None
        shards = _shards_on_disk(model_dir, kind)
        if shards:
            # no index: the -0000k-of-0000N names are all there is to check against
            numbers = [_SHARD_RE[kind].fullmatch(p.name).groups() for p in shards]
            counts = {int(n) for _, n in numbers}
            if len(counts) != 1:
                raise LlmconvError(f"shards disagree on how many there are ({sorted(counts)})", file=shards[0])
            n = counts.pop()
            missing = sorted(set(range(1, n + 1)) - {int(k) for k, _ in numbers})
            if missing:
                k_digits, n_text = len(numbers[0][0]), numbers[0][1]
                want = _SINGLE[kind].replace(".", f"-{missing[0]:0{k_digits}d}-of-{n_text}.", 1)
                raise LlmconvError(f"shard {missing[0]} of {n} is missing", file=model_dir / want)
            return kind, sorted(shards, key=_shard_key), None, None
    if kinds == ("consolidated",):
        raise LlmconvError(
            "no weights found: expected consolidated.safetensors or consolidated-0000k-of-0000N.safetensors",
            file=model_dir,
        )
    raise LlmconvError(
        "no weights found: expected model.safetensors, model-0000k-of-0000N.safetensors "
        "(+ model.safetensors.index.json) or pytorch_model*.bin",
        file=model_dir,
    )


def _shard_key(p: Path):
    m = re.search(r"-(\d+)-of-\d+\.", p.name)
    return (int(m.group(1)) if m else 0, p.name)


def open_weights(
    model_dir: Path, kinds: tuple[str, ...] = ("safetensors", "bin")
) -> tuple[dict[str, WeightEntry], list[Path]]:
    """name -> WeightEntry for every tensor in the checkpoint, in file order; nothing is read yet."""
    kind, files, wmap, index = find_weight_files(model_dir, kinds)
    entries: dict[str, WeightEntry] = {}
    for path in files:
        for name, entry in _bin_entries(path) if kind == "bin" else _safetensors_entries(path):
            if name in entries:
                raise LlmconvError(f"tensor is stored twice, also in {entries[name].file.name}", file=path, tensor=name)
            if wmap is not None and wmap.get(name) != path.name:
                where = f"listed under {wmap[name]}" if name in wmap else "not listed"
                raise LlmconvError(f"tensor in {path.name} is {where} in {index.name}", file=path, tensor=name)
            entries[name] = entry
    if wmap is not None:
        for name, fname in wmap.items():
            if name not in entries:
                raise LlmconvError(
                    f"{index.name} lists the tensor in {fname} but it is not there", file=model_dir / fname, tensor=name
                )
    return entries, files


def _safetensors_entries(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        # the numpy view of the header: framework="pt" would import torch (~1.4 s of CPU) to
        # read names, dtypes and shapes; torch's handle is opened only if a tensor is `get`
        handle = safe_open(str(path), framework="numpy")
        names = list(handle.keys())
        meta = [(n, handle.get_slice(n)) for n in names]
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmconvError(f"not a readable safetensors file: {_first_line(e)}", file=path) from None
    places = _safetensors_places(path)
    file = SourceFile(path) if places else None
    torch_handle = _opened_on_first_use(path)
    for name, sl in meta:
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise LlmconvError(f"unsupported dtype {sl.get_dtype()} (bf16, f16, f32)", file=path, tensor=name)
        shape = tuple(sl.get_shape())
        raw = None
        if file is not None and name in places:
            raw = RawTensor(file, places[name][0], dtype, shape, name)
            if places[name][1] - places[name][0] != raw.nbytes:
                raw = None
        yield (
            name,
            WeightEntry(
                path,
                shape,
                dtype,
                lambda h=torch_handle, n=name: h().get_tensor(n),
                raw,
                lambda i, h=torch_handle, n=name: h().get_slice(n)[i],
            ),
        )


def _opened_on_first_use(path: Path):
    """A function returning one safe_open(path, framework="pt") handle, opened on its first call."""
    handles = []

    def handle():
        if not handles:
            from safetensors import safe_open

            handles.append(safe_open(str(path), framework="pt"))
        return handles[0]

    return handle


def _safetensors_places(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (first byte, end) of its data in the file, from the header safe_open has already
    checked (8-byte little-endian length, JSON, then the data; offsets relative to the data)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return {
            k: (8 + n + int(v["data_offsets"][0]), 8 + n + int(v["data_offsets"][1]))
            for k, v in header.items()
            if k != "__metadata__"
        }
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return {}  # safe_open read it, so this does not happen; `get` still works


def _bin_entries(path: Path):
    from .pth import safe_torch_load
    from .torch_zip import TORCH_DTYPE_NAMES, raw_tensors

    sd = safe_torch_load(path)
    raws = raw_tensors(path, sd) or {}
    for name, t in sd.items():
        dtype = TORCH_DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise LlmconvError(f"unsupported dtype {t.dtype} (bf16, f16, f32)", file=path, tensor=name)
        yield name, WeightEntry(path, tuple(t.shape), dtype, lambda t=t: t, raws.get(name))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
