"""The ``weightsmith`` command: one sub-command per stage, each a thin layer over a library function."""
from __future__ import annotations

import os
import sys

import typer

from ..errors import WeightsmithError

OFFLINE_BY_DEFAULT = "WEIGHTSMITH_OFFLINE_BY_DEFAULT"

app = typer.Typer(
    name="weightsmith",
    help="Compress and merge Hugging Face transformer checkpoints, stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    pretty_exceptions_enable=False,
)

# Each module registers its commands on ``app``.
from . import inspect_cmd, eval_cmd, export_cmd, zoo_cmd, push_cmd, analyze_cmd, compress_cmd, fold_cmd, run_cmd, merge_cmd, align_cmd  # noqa: E402,F401


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # read by transformers when (and only if) a stage imports it: importing it here would cost a second
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "HF_HUB_OFFLINE" not in os.environ:
        # Local stages never need the network; push lifts this default, but not a user's own setting.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ[OFFLINE_BY_DEFAULT] = "1"


def main() -> None:
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except WeightsmithError as exc:
        from .common import err_console

        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
