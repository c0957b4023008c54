"""The safetensors container: validated reads and atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import Tensor

from ..errors import CorruptFileError, format_keys

READABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32})


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a file; a typed error for anything unreadable or non-finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such adapter file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors reports broken headers/data with several exception types
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    check_tensors(tensors, str(path))
    return tensors, metadata


def check_tensors(tensors: Mapping[str, Tensor], where: str) -> None:
    """Refuse dtypes no algorithm stores and NaN/Inf values, naming the keys."""
    bad_dtype = [k for k, t in tensors.items() if t.dtype not in READABLE_DTYPES]
    if bad_dtype:
        found = sorted({str(tensors[k].dtype) for k in bad_dtype})
        raise CorruptFileError(
            f"{where}: unsupported dtypes {found} in {format_keys(bad_dtype)}", keys=bad_dtype
        )
    non_finite = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if non_finite:
        raise CorruptFileError(f"{where}: NaN or Inf values in {format_keys(non_finite)}", keys=non_finite)


def data_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the tensor-data section, as A1111/kohya compute `sshs_model_hash`."""
    blob = save(dict(tensors))
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(output: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling of `output` (yielded) and rename it into place when
    the block ends without an error; an existing `output` is replaced only then. On an error the
    temporary folder is deleted and `output` is untouched."""
    output = Path(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"folder does not exist: {output.parent}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(tmp, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
