"""How every `qdora` command ends on an error, in one place instead of a try/except per command.

Expected errors (QdoraError: bad input, full disk, unwritable output) print one line and exit 1. An
OSError that is a full disk or a permission problem but was raised outside a labelled write still gets
one line naming its file. Anything else is a bug: its traceback is printed, then a line saying which
command failed and what it was doing, and the exit status is 1.
"""

from __future__ import annotations

import sys
import traceback

import click

from qdora.errors import QdoraError


def _os_error_message(e: OSError) -> str | None:
    from qdora.io.os_errors import REASONS

    if e.errno not in REASONS:
        return None
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write{where}: {REASONS[e.errno]}"


class QdoraGroup(click.Group):
    """A click group whose commands report errors as described in the module docstring."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                SystemExit, KeyboardInterrupt):
            raise
        except QdoraError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:
            message = _os_error_message(e)
            if message is None:
                _report_bug(ctx, e)
            raise click.ClickException(message) from e
        except Exception as e:
            _report_bug(ctx, e)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        ctx.meta["qdora_command"] = name
        return name, cmd, rest


def _report_bug(ctx: click.Context, e: BaseException) -> None:
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    command = ctx.meta.get("qdora_command") or "qdora"
    doing = getattr(e, "qdora_doing", None)
    click.echo(f"qdora {command}: unexpected error{f' while {doing}' if doing else ''} "
               f"({type(e).__name__}); this is a bug in qdora, please report it with the traceback above",
               err=True)
    sys.exit(1)
