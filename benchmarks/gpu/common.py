"""What every phase shares: the output folder, a log that sees every subprocess, JSON and Markdown out.

Phases run the real entry points (pytest, the `qdora` CLI, the benchmark scripts) as subprocesses with a
timeout each, so one hang or crash costs that command, not the whole slice of GPU time, and its output
still lands in the phase's log.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("QDORA_GPU_SITE", "/tmp/qdora-site"))  # where the setup phase installs wheels
WHEELS = ROOT / ".whl"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every subprocess: the repo and the installed wheels importable, no hub, unbuffered."""
    paths = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else []) + [os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra or {})
    return env


@dataclass
class Phase:
    """One phase's run: its name, output folder, dry-run flag, log file, and what it has to report."""

    name: str
    out: Path
    dry_run: bool
    rows: list[dict] = field(default_factory=list)  # one per check: name, ok, seconds, detail
    data: dict = field(default_factory=dict)  # anything else for PHASE.json
    markdown: list[str] = field(default_factory=list)  # extra Markdown (tables) for RESULTS.md

    def __post_init__(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / f"{self.name}.log"
        self.log_path.write_text("")
        self.start = time.time()

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def log(self, text: str) -> None:
        """Into the phase log and onto stdout (the device tool returns the tail of stdout)."""
        with self.log_path.open("a") as f:
            f.write(text.rstrip("\n") + "\n")
        print(text.rstrip("\n"), flush=True)

    def sh(self, cmd: list[str], timeout: float, check: str | None = None, env: dict | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a command, its output appended to the log; `check` names a row recorded with its outcome."""
        self.log(f"$ {shlex.join(cmd)}")
        if self.dry_run:
            timeout *= 3  # tiny shapes, but 2 shared CPU cores under a test suite: generous
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=child_env(env), cwd=cwd or ROOT, capture_output=True, text=True,
                                  timeout=timeout)
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            out += f"\n(timed out after {timeout:.0f} s)"
            proc, rc = subprocess.CompletedProcess(cmd, 124, out, ""), 124
        dt = time.time() - t0
        with self.log_path.open("a") as f:
            f.write(out + f"\n[exit {rc} after {dt:.1f} s]\n")
        if check:
            self.row(check, rc == 0, dt, f"exit {rc}" + ("" if rc == 0 else ": " + _last_line(out)))
        return proc

    def row(self, name: str, ok: bool, seconds: float | None = None, detail: str = "") -> None:
        self.rows.append(dict(check=name, ok=bool(ok), seconds=seconds, detail=detail))
        self.log(f"{'PASS' if ok else 'FAIL'} {name}" + (f" ({seconds:.1f} s)" if seconds is not None else "")
                 + (f": {detail}" if detail else ""))

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def finish(self) -> dict:
        """Write PHASE.json, regenerate RESULTS.md from every PHASE.json in the folder, print this phase's part."""
        report = dict(phase=self.name, ok=self.ok, dry_run=self.dry_run, seconds=time.time() - self.start,
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      command=shlex.join([sys.executable, "-m", "benchmarks.gpu", *sys.argv[1:]]),
                      host=platform.node(), rows=self.rows, markdown=self.markdown, data=self.data)
        (self.out / f"{self.name}.json").write_text(json.dumps(report, indent=2, default=str))
        text = phase_markdown(report)
        (self.out / "RESULTS.md").write_text(results_markdown(self.out))
        print(text, flush=True)
        return report


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def phase_markdown(rep: dict) -> str:
    lines = [f"### {rep['phase']}{' (dry run, CPU)' if rep['dry_run'] else ''}: "
             f"{'ok' if rep['ok'] else 'FAILED'} in {rep['seconds']:.0f} s, {rep['date']}", "",
             f"`{rep['command']}`", ""]
    if rep["rows"]:
        lines += ["| check | result | s | detail |", "|---|---|---|---|"]
        for r in rep["rows"]:
            s = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
            lines.append(f"| {r['check']} | {'pass' if r['ok'] else 'FAIL'} | {s} | {r['detail']} |")
    for block in rep["markdown"]:
        lines += ["", block]
    return "\n".join(lines) + "\n"


def results_markdown(out: Path) -> str:
    """Every phase found in `out`, in the order of PHASES: the file to paste into benchmarks/RESULTS.md."""
    from benchmarks.gpu.phases import PHASES

    parts = ["## GPU check\n"]
    for name in PHASES:
        p = out / f"{name}.json"
        if p.is_file():
            parts.append(phase_markdown(json.loads(p.read_text())))
    return "\n".join(parts)
