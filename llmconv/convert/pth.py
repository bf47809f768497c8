"""torch.save files (Meta's consolidated.NN.pth, Hugging Face's pytorch_model*.bin): checked,
then read without torch where they are plain state dicts (torch_pickle.py), else loaded with
torch.load(mmap=True, weights_only=True). Pickled code never runs either way."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import LlmconvError
from ..formats.rawread import RawTensor
from .guards import check_tensor_storage, scan_torch_pickle
from .torch_pickle import read_state_dict


def safe_torch_load(path: Path, checked: bool = False) -> dict:
    """torch.load that never runs pickled code and never reads past the file's end
    (`checked`: the zip and the pickle were already checked)."""
    import torch

    if not checked:
        _check_zip(path)
        scan_torch_pickle(path)  # before torch unpickles anything: only what a state dict needs
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise LlmconvError(
            "refused to load: the pickle holds code or objects that are not plain tensors "
            f"(weights_only=True said: {_first_line(e)})",
            file=path,
        ) from None
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


def open_shard(path: Path) -> tuple[dict[str, RawTensor] | None, dict | None]:
    """(where each tensor lies, None) for a plain state dict, read without torch; else
    (where torch's mapping placed them or None, torch's state dict)."""
    _check_zip(path)
    scan_torch_pickle(path)  # before anything unpickles it: only what a state dict needs
    raw = read_state_dict(path)
    if raw is not None:
        return raw, None
    state = safe_torch_load(path, checked=True)
    from .torch_zip import raw_tensors

    return raw_tensors(path, state), state


def open_shards(paths: list[Path]) -> tuple[list[dict[str, RawTensor] | None], list[dict] | None]:
    """(per shard: where each tensor lies, or None; per shard: torch's state dict, or None
    when every shard was read without torch). If torch has to read one shard, it reads all
    of them, so the caller sees one kind of tensor."""
    opened = [open_shard(p) for p in paths]
    raws = [raw for raw, _ in opened]
    if all(state is None for _, state in opened):
        return raws, None
    states = [state if state is not None else safe_torch_load(p, checked=True) for p, (_, state) in zip(paths, opened)]
    if any(state is None for _, state in opened):
        from .torch_zip import raw_tensors

        raws = [raw_tensors(p, s) for p, s in zip(paths, states)]
    return raws, states


def mapped_bytes(t) -> np.ndarray:
    """A numpy view of a torch tensor's memory-mapped bytes: bf16 as its uint16 bits."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def is_float(t) -> bool:
    if isinstance(t, RawTensor):
        return True  # torch_pickle reads only bf16, f16 and f32 storages
    import torch

    return t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def same_values(a, b) -> bool:
    """torch.equal for two shards' copies of a replicated (1-D, small) tensor."""
    if isinstance(a, RawTensor) and isinstance(b, RawTensor):
        return a.shape == b.shape and bool(np.array_equal(a.load(), b.load()))
    import torch

    return torch.equal(a, b)
