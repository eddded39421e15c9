"""K-quants (Q4_K_M, ...) through llama.cpp's own quantizer: gguf-py has no K-quant encoders, and a
hand-written one would drift from what llama.cpp decodes."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from qdora.errors import QdoraError
from qdora.io.atomic import atomic_write
from qdora.io.os_errors import NEARLY_FULL
from qdora.io.preflight import free_bytes

INSTALL_HINT = "install it with scripts/install_llamacpp.sh (or `pip install llama-cpp-python`)"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise QdoraError(f"--quantize needs llama-cpp-python (llama.cpp's quantizer): {INSTALL_HINT}") from e
    return llama_cpp


def quantized_path(gguf_path: Path, qtype: str) -> Path:
    """model.gguf + Q4_K_M -> model.Q4_K_M.gguf, next to it."""
    return gguf_path.with_name(f"{gguf_path.stem}.{qtype.upper()}{gguf_path.suffix}")


def llama_ftype(qtype: str) -> int:
    """llama.cpp's file-type id for a quantization name like Q4_K_M; clear errors before any work is done."""
    llama_cpp = _llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise QdoraError(f"unknown quantization {qtype!r}; llama.cpp offers {', '.join(known)}")
    return int(ftype)


def quantize_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """Quantize the GGUF `src` to `dst` with llama.cpp's default parameters for `qtype` (e.g. Q4_K_M)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(qtype)
    params.nthread = os.cpu_count() or 1

    def write(tmp: Path) -> None:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            free = free_bytes(tmp)
            if free is not None and free < NEARLY_FULL:  # llama.cpp reports no errno: ask the disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            raise QdoraError(f"llama.cpp failed to quantize {src} to {qtype} (return code {rc})")

    return atomic_write(dst, write)
