"""Print, as one JSON line, what the GPU check runs on: versions, device, free memory, a bitsandbytes round trip."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import sys


def main() -> int:
    info: dict = {"python": platform.python_version(), "executable": sys.executable}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "datasets",
                 "safetensors", "tokenizers", "numpy"):
        try:
            mod = importlib.import_module(name)
            info[name] = getattr(mod, "__version__", None) or importlib.metadata.version(name)
        except Exception as e:  # noqa: BLE001  (a missing or broken package is what this reports)
            info[name] = f"MISSING ({type(e).__name__}: {e})"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    free_gib=free / 2**30, total_gib=total / 2**30, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # the NF4 kernels qdora uses, on the device, against the CPU's bytes
        import bitsandbytes.functional as bnbf

        w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
        q_cpu, s_cpu = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        q_dev, s_dev = bnbf.quantize_4bit(w.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
        deq = bnbf.dequantize_4bit(q_dev, s_dev).cpu()
        info["bnb_nf4_bytes_equal_cpu"] = bool(torch.equal(q_cpu, q_dev.cpu()))
        info["bnb_nf4_rel_error"] = float((deq - w).norm() / w.norm())
        info["bnb_nf4_roundtrip_ok"] = info["bnb_nf4_rel_error"] < 0.15
    except Exception as e:  # noqa: BLE001
        info["bnb_nf4_roundtrip_ok"] = False
        info["bnb_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
