"""What every command shares: the console, one-line errors, and the executor options, declared once.

A command parses its options, calls one library function (`mert_pipeline.pipeline` and friends) inside
`errors()`, and prints what came back. `errors()` turns the library's `PipelineError` into a one-line
`error:` and exit code 2, and `StageFailed` into the failed tasks' one-line reasons and exit code 1.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer import _click as click  # typer's own copy of click, whose classes its commands use
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.pipeline import PipelineError, StageFailed
from mert_pipeline.progress import ConsoleProgress

console = Console(stderr=True)


# --------------------------------------------------------------------------------------------------
# Help that reads as sentences: one command class for every command, one group class for every group
# --------------------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


def reflow(text: str | None) -> str | None:
    """Docstring paragraphs as single lines, so the terminal wraps sentences, not the source's lines."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


def _tidy(param: click.Parameter) -> None:
    """A flag shows no type; another option shows a word (its own metavar, else N, NUMBER, TEXT, PATH);
    an argument shows its name, with ... when it takes several."""
    if isinstance(param, TyperOption):
        if param.is_flag:
            param.metavar = ""
        elif param.metavar is None:
            annotation = param.type_descriptor.annotation
            param.metavar = _TYPE_WORDS.get(
                annotation,
                "PATH" if isinstance(annotation, type) and issubclass(annotation, Path) else "TEXT",
            )
        param.help = reflow(param.help)
    elif isinstance(param, TyperArgument):
        name = param.metavar or (param.name or "").upper()
        param.metavar = name + ("..." if param.nargs != 1 and not name.endswith("...") else "")
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        param.help = reflow(param.help)


class _Readable:
    """What commands and groups share: help re-flowed, every parameter (and --help) shown as words."""

    help: str | None
    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)
        for param in self.params:
            _tidy(param)

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _tidy(option)
        return option


class Command(_Readable, TyperCommand):
    """Every `mert-pipe` command: readable help, and usage as `run [OPTIONS] ROOT...`."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


class Group(_Readable, TyperGroup):
    """`mert-pipe` and its groups (kmeans, export), readable like a command."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error; the caller raises what this returns (exit code 2: misuse)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """The library's errors as the CLI shows them (module docstring)."""
    try:
        yield
    except PipelineError as exc:
        raise fail(str(exc), getattr(exc, "exit_code", 2)) from exc
    except StageFailed as exc:
        for outcome in exc.report.failed[:10]:
            console.print(
                f"[red]task {outcome.rank} failed:[/] {outcome.error}", highlight=False, soft_wrap=True
            )
        console.print(f"[bold red]{exc}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from exc


def progress() -> ConsoleProgress:
    """The run's one live display on stderr (bars on a terminal, summaries always)."""
    return ConsoleProgress(console)


def note(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# The executor options: declared once, added to every command that runs stages
# --------------------------------------------------------------------------------------------------

_KW = inspect.Parameter.KEYWORD_ONLY
EXECUTOR_OPTIONS = [
    inspect.Parameter(
        "executor_kind",
        _KW,
        default="local",
        annotation=Annotated[
            str,
            typer.Option(
                "--executor",
                metavar="local|ray",
                help="local: a process pool on this machine; ray: Ray on a cluster.",
            ),
        ],
    ),
    inspect.Parameter(
        "workers",
        _KW,
        default=None,
        annotation=Annotated[
            int | None,
            typer.Option(
                "--workers",
                min=1,
                help="Worker processes (local) or CPUs of the local Ray started. Default: each stage's "
                "own (a model stage: one per GPU, or one using every core; the others: one per core).",
            ),
        ],
    ),
    inspect.Parameter(
        "ray_address",
        _KW,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(
                "--ray-address",
                envvar="RAY_ADDRESS",
                help="Existing Ray cluster (default: start a local one).",
            ),
        ],
    ),
    inspect.Parameter(
        "max_retries",
        _KW,
        default=3,
        annotation=Annotated[
            int,
            typer.Option("--max-retries", min=0, help="Ray: retries of a task whose worker process died."),
        ],
    ),
    inspect.Parameter(
        "cpus_per_task",
        _KW,
        default=None,
        annotation=Annotated[
            float | None,
            typer.Option(
                "--cpus-per-task", min=0.0, help="Ray: CPUs one task reserves (default: the stage's)."
            ),
        ],
    ),
    inspect.Parameter(
        "gpus_per_task",
        _KW,
        default=None,
        annotation=Annotated[
            float | None,
            typer.Option(
                "--gpus-per-task",
                min=0.0,
                help="Ray: GPUs one task reserves, fractions allowed (default: the stage's).",
            ),
        ],
    ),
]
FORCE_OPTION = inspect.Parameter(
    "force",
    _KW,
    default=False,
    annotation=Annotated[bool, typer.Option("--force", help="Redo every task, even those already complete.")],
)


def executor_config(
    executor_kind: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    max_retries: int = 3,
    cpus_per_task: float | None = None,
    gpus_per_task: float | None = None,
    force: bool = False,
) -> ExecutorConfig:
    if executor_kind not in ("local", "ray"):
        raise fail(f"--executor must be 'local' or 'ray', not {executor_kind!r}")
    return ExecutorConfig(
        kind=executor_kind,  # type: ignore[arg-type]
        workers=workers,
        ray_address=ray_address,
        force=force,
        max_retries=max_retries,
        cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task,
    )


def with_executor(force: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the executor options (and `--force`); it receives them as one `executor:
    ExecutorConfig` argument. The options are declared here only, so every command spells them alike."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "executor"
        ]
        added = EXECUTOR_OPTIONS + ([FORCE_OPTION] if force else [])

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            options = {p.name: kwargs.pop(p.name) for p in added}
            return command(executor=executor_config(**options), **kwargs)

        params = own + added
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must see the wrapper's signature, not the command's
        return wrapper

    return decorate


def teacher_list(text: str | None) -> list[str] | None:
    """`rvq,kmeans500` -> ["rvq", "kmeans500"]; None or empty -> None."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None
