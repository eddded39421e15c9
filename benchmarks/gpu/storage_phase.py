"""storage: all 65,536 16-bit patterns through every path NF4 bytes take, bit for bit (storage_check.py).

Runs both layouts where torch allows both: bf16-viewed bytes (torch < 2.13's, forced with
QDORA_NF4_STORAGE) and uint8 (torch >= 2.13). A `qdora` row that changes a word fails the phase; the
`diagnostic` rows show the raw fault the byte-safe policy avoids (expected to change words on CUDA).
"""

from __future__ import annotations

import json
import sys

from benchmarks.gpu.common import Phase


def run(phase: Phase) -> None:
    import torch

    from qdora.core.nf4 import torch_accepts_uint8_params

    layouts = ["bfloat16"] + (["uint8"] if torch_accepts_uint8_params() else [])
    lines = ["| storage | path | changed words of 65,536 |", "|---|---|---|"]
    for storage in layouts:
        out = phase.out / f"storage-{storage}.json"
        proc = phase.sh([sys.executable, "-m", "benchmarks.gpu.storage_check", "--device", phase.device,
                         "--storage", storage, "--json", str(out)], timeout=150)
        if not out.is_file():
            phase.row(f"{storage}: storage check ran", False, None, f"exit {proc.returncode}")
            continue
        rep = json.loads(out.read_text())
        out.unlink()  # folded into storage.json (the device tool returns at most 8 files)
        phase.data[storage] = rep
        for path, n in rep["changed_words"].items():
            lines.append(f"| {storage} | {path} | {'refused' if n < 0 else n} |")
            if path.startswith("qdora"):
                phase.row(f"{storage}: {path.removeprefix('qdora: ')}", n == 0, None,
                          "bit-exact" if n == 0 else ("refused" if n < 0 else f"{n} words changed"))
    phase.markdown.append(f"torch {torch.__version__}, device {phase.device}\n\n" + "\n".join(lines))
