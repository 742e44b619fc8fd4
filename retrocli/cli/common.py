"""What every command shares: the consoles, one-line errors, JSON output, progress bars, the Dask client."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from retrocli.errors import RetroError, is_disk_full
from retrocli.storage import shown

# emoji=False: ":fire:" in a path, a query or corpus text stays ":fire:". Markup is ours alone: every
# user-supplied value goes through user() below.
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


class RetroCommand(TyperCommand):
    """Usage lines in the usual form (`retro info [OPTIONS] DB`, where typer writes `{db}`), and a
    `--help` that shows no `<bool>` type."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def get_help_option(self, ctx):
        return _untyped(super().get_help_option(ctx))


class RetroGroup(TyperGroup):
    """`retro --help` without the `<bool>` type, like its commands; a usage error (`--k abc`, a missing
    argument, an unknown command or option) is one `error:` line, not click's usage box."""

    def get_help_option(self, ctx):
        return _untyped(super().get_help_option(ctx))

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():  # a command's own options are parsed here
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except typer.TyperException as err:  # typer's own click's ClickException and its usage errors
        if type(err).__name__ == "NoArgsIsHelpError" or not hasattr(err, "format_message"):
            raise  # `retro` or `retro info` alone: the help, as before
        command = getattr(getattr(err, "ctx", None), "command_path", "retro")
        message = err.format_message().rstrip(".")
        err_console.print(f"[bold red]error:[/] {user(message)} (see `{user(command)} --help`)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None


def _untyped(option):
    if option is not None:
        option.metavar = ""
    return option


def user(text) -> str:
    """User-supplied text (paths, queries, corpus text, ids, names) made inert for rich: "[/]" or
    "[bold]" in it prints as typed instead of being read as markup. A DB's copy in --cache-dir is shown
    as its URL, a path's byte that is not UTF-8 as \\xHH."""
    return escape(_UNDECODABLE_BYTE.sub(lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}", shown(text)))


_UNDECODABLE_BYTE = re.compile("[\udc80-\udcff]")  # os.fsdecode's surrogate escapes


_open_line = False  # stream_text left stdout in the middle of a line


def stream_text(text: str) -> None:
    """Write text to stdout as it is made (generation), remembering whether a line was left open."""
    global _open_line
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
        _open_line = not text.endswith("\n")


def _end_open_line() -> None:
    """An error after streamed text starts on a line of its own, not glued to the text."""
    global _open_line
    if _open_line:
        stream_text("\n")


def handle_errors(fn):
    """Turn RetroError into one clear line and exit code 2: users never see a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _open_line
        _open_line = False  # a command starts with nothing of its own on the line (in-process runs share this)
        try:
            return fn(*args, **kwargs)
        except RetroError as err:
            _end_open_line()
            err_console.print(f"[bold red]error:[/] {user(err)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as err:
            if is_disk_full(err):  # every write is atomic, so what finished is kept and a rerun resumes
                file = _file_being_written(err)
                where = f" writing {user(file)}" if file else f" writing under {user(_output_of(kwargs))}"
                err_console.print(f"[bold red]error:[/] no space left on device{where}; free some space and "
                                  "rerun the same command (finished work is kept)", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            if type(err).__module__.split(".")[0] in ("botocore", "aiobotocore"):  # object storage said no
                _end_open_line()
                err_console.print(f"[bold red]error:[/] object storage: {user(err)} (credentials and endpoint "
                                  "come from the environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …)",
                                  highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            raise
        except KeyboardInterrupt:
            _end_open_line()
            err_console.print("[bold red]interrupted[/]: completed work is kept; rerun to resume")
            raise typer.Exit(130) from None

    return wrapper


def _file_being_written(err: BaseException) -> str | None:
    """The file a write that failed was writing. A failed write() carries no file name, so without the
    error's own, the innermost frame that knows one: a `path`/`filename` local (zarr's and our atomic
    writers name the final file so), else an open file object there (pathlib's write_text)."""
    if getattr(err, "filename", None):
        return os.fsdecode(err.filename)
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        names = frame.f_locals
        for key in ("path", "filename"):
            value = names.get(key)
            if isinstance(value, os.PathLike) or (key == "filename" and isinstance(value, str)):
                return os.fsdecode(value)
        for value in names.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return None


def _output_of(kwargs: dict) -> str:
    """What a command writes, for a message that has no file: its --out, else its DB."""
    return str(kwargs.get("out") or kwargs.get("db") or "the output")


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def progress_display(enabled: bool = True):
    from retrocli.progress import RichProgress  # lazy: see cli/__init__.py

    return RichProgress(console=err_console, enabled=enabled)



@contextlib.contextmanager
def cluster(dask: str | None):
    """The Dask client for --dask (None without it), with one line saying where the work runs."""
    from retrocli.cluster import dask_client  # lazy: see cli/__init__.py

    with dask_client(dask) as client:
        if client is not None:
            workers = len(client.scheduler_info().get("workers", {}))
            err_console.print(f"[dim]Dask: {workers} worker(s) at {user(client.scheduler.address)}[/]")
        yield client



def write_text(path: Path, text: str) -> None:
    from retrocli.artifacts import write_text_atomic  # lazy: see cli/__init__.py

    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise RetroError(f"{path}: cannot write ({err.strerror})") from None
