"""`qdora train`'s click options, generated from `TrainConfig` so that help, defaults and YAML keys agree."""

from __future__ import annotations

import click

from qdora.train.config import CHOICES, option_fields

EPILOG = """\b
Examples:
  qdora train --model BASE --data train.jsonl --output runs/r1 --method dora --rank 16 --max-steps 1000
  qdora train --config run.yaml --lr 1e-4          # flags override the file
  qdora train --output runs/r1 --config run.yaml --resume latest
\b
Several GPUs (FSDP2, one process per GPU; multi-node: torchrun's --nnodes/--node-rank/--rdzv-endpoint):
  torchrun --nproc_per_node 2 -m qdora.cli train --model BASE --data train.jsonl --output runs/r1
\b
Exit codes: 0 done; 1 bad input or a stopped run (message says why); 130/143 interrupted by SIGINT/SIGTERM
after writing OUTPUT/checkpoint-STEP (continue with --resume latest).
"""


def train_options(func):
    """Decorate `func` with one click option per TrainConfig field (default None = 'not given')."""
    for f in reversed(option_fields()):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + ("" if f.default is None else f"  [default: {_show(f.default)}]")
        if f.metadata.get("flag"):
            opt = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
        elif f.name == "resume":
            opt = click.option(flag, f.name, default=None, is_flag=False, flag_value="latest",
                               metavar="[DIR|latest]", help=help_text + "  (--resume alone = latest)")
        else:
            typ = {"int": int, "float": float}.get(f.type, str)
            metavar = CHOICES[f.name].metavar if f.name in CHOICES else None
            opt = click.option(flag, f.name, type=typ, default=None, metavar=metavar, help=help_text)
        func = opt(func)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                        help="YAML file of options (same names; flags override it).")(func)


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
