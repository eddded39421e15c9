"""`python -m benchmarks.gpu --phase setup,storage,tests --out DIR [--dry-run]`: run phases in order.

Exit status 0 when every check of every phase passed, 1 otherwise (the phases still all run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.gpu.phases import PHASES, run_phase


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", required=True,
                   help=f"comma list from {', '.join(PHASES)}, or 'all' (each fits one 10-minute command)")
    p.add_argument("--out", required=True, help="folder for PHASE.log, PHASE.json and RESULTS.md")
    p.add_argument("--dry-run", action="store_true", help="every phase at tiny shapes on the CPU")
    args = p.parse_args(argv)
    args.phases = list(PHASES) if args.phase == "all" else [s.strip() for s in args.phase.split(",") if s.strip()]
    bad = [s for s in args.phases if s not in PHASES]
    if bad or not args.phases:
        p.error(f"unknown phase(s) {', '.join(bad) or '(none)'}: choose from {', '.join(PHASES)} or all")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a folder", file=sys.stderr)
        return 1
    ok = True
    for name in args.phases:
        ok &= run_phase(name, out, args.dry_run).ok
    print(f"\nGPU check {'passed' if ok else 'FAILED'}: {', '.join(args.phases)} -> {out}/RESULTS.md", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
