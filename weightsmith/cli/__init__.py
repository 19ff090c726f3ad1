"""The ``weightsmith`` command: one sub-command per stage, each a thin layer over a library function."""
from __future__ import annotations

import gc
import os
import signal
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
    from . import inspect_cmd, eval_cmd, export_cmd, zoo_cmd, push_cmd, analyze_cmd, compress_cmd, fold_cmd, run_cmd, merge_cmd, align_cmd, download_cmd, extract_lora_cmd, moe_cmd  # noqa: E402,F401,E501


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # read by transformers when (and only if) a stage imports it: importing it here would cost a second
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "HF_HUB_OFFLINE" not in os.environ:
        # Local stages never need the network; push lifts this default, but not a user's own setting.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ[OFFLINE_BY_DEFAULT] = "1"


class Stopped(BaseException):
    """SIGINT or SIGTERM, raised where the command is: unwinding it removes its temp folders (``output_folder``)
    and its locks before the command exits with 128 + the signal's number. A BaseException, so no stage's
    ``except Exception`` takes it for a failure of its own."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum, frame) -> None:
    for sig in _STOP_SIGNALS:  # the clean-up runs once, not interrupted by a second Ctrl-C
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def main() -> None:
    """The console script: the command's exit status is 0, 2 for a refusal, 130 after SIGINT, 143 after SIGTERM."""
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS}
    try:
        _main()
    except Stopped as exc:  # the handlers are left ignoring a late second signal while the process ends
        _fail(f"{'interrupted' if exc.signum == signal.SIGINT else 'terminated'} by "
              f"{signal.Signals(exc.signum).name}; temporary files removed", code=128 + exc.signum)
    except BaseException:
        _restore(previous)
        raise
    _restore(previous)


def _restore(handlers: dict) -> None:
    """Put back the handlers ``main`` replaced (it may run inside a longer-lived process)."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _main() -> None:
    _quiet_libraries()
    return_freed_memory()  # a stage's peak memory is its weights and one batch, not every batch it freed
    # What the imports built lives as long as the process: later collections need not walk it again.
    gc.freeze()
    try:
        code = app(standalone_mode=False)  # a typer.Exit comes back as its code here, not raised
        if isinstance(code, int) and not isinstance(code, bool) and code:
            sys.exit(code)
    except OptionError as exc:  # one a command did not word itself: its options are flags here
        from .options import flag

        _fail(str(exc) if exc.where else exc.render(flag))
    except WeightsmithError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:  # raised by something other than the handler (which raises Stopped)
        raise Stopped(signal.SIGINT) from None
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
    finally:
        writer = sys.modules.get("weightsmith.checkpoint.writer")  # loaded by every command that locks an output
        if writer is not None:
            writer.release_locks()


def _fail(message: str, code: int = 2) -> None:
    """The one way a refusal leaves the CLI: ``error: MESSAGE`` on one stderr line, exit status 2 (or ``code``)."""
    from .common import err_console, styled

    message = " ".join(message.split())  # one line, whatever the message held
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # bytes argv could not decode, as \xNN
    err_console.print(styled(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    sys.exit(code)
