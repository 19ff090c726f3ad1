"""The ``weightsmith`` command: one sub-command per stage, each a thin layer over a library function."""
from __future__ import annotations

import gc
import os
import sys

import typer

from ..errors import OptionError, WeightsmithError
from ..startup import return_freed_memory, without_collections

OFFLINE_BY_DEFAULT = "WEIGHTSMITH_OFFLINE_BY_DEFAULT"  # checkpoint.network reads it (not imported: start-up)

app = typer.Typer(
    name="weightsmith",
    help="Compress and merge Hugging Face transformer checkpoints, stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    pretty_exceptions_enable=False,
)

# Each module registers its commands on ``app`` (imported without collections in between, as the package is).
with without_collections():
    from . import inspect_cmd, eval_cmd, export_cmd, zoo_cmd, push_cmd, analyze_cmd, compress_cmd, fold_cmd, run_cmd, merge_cmd, align_cmd, download_cmd  # noqa: E402,F401,E501


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
    return_freed_memory()  # a stage's peak memory is its weights and one batch, not every batch it freed
    # What the imports built lives as long as the process: later collections need not walk it again.
    gc.freeze()
    try:
        app(standalone_mode=False)
    except OptionError as exc:  # one a command did not word itself: its options are flags here
        from .options import flag

        _fail(str(exc) if exc.where else exc.render(flag))
    except WeightsmithError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # command-line usage errors come through here in non-standalone mode
        kinds = {k.__name__ for k in type(exc).__mro__}
        if "NoArgsIsHelpError" in kinds:  # a bare group or command: its help, as asked
            exc.show()
            sys.exit(2)
        if "ClickException" in kinds:  # click's, or the copy of click that typer >= 0.16 vendors
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            _fail(f"{exc.format_message()}{where}")
        if "Exit" in kinds:
            sys.exit(getattr(exc, "exit_code", 0))
        if "Abort" in kinds:
            sys.exit(1)
        raise


def _fail(message: str) -> None:
    """The one way a refusal leaves the CLI: ``error: MESSAGE`` on one stderr line, exit status 2."""
    from .common import err_console

    message = " ".join(message.split())  # one line, whatever the message held
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(2)
