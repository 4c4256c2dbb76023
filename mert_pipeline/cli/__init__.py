"""`mert-pipe`: one command per step, each a thin caller of a library function (`mert_pipeline.pipeline`).

The commands live in one module per domain: `data` (manifest, resample), `teachers` (tokenize, features,
kmeans), `shards` (shard, verify, export fairseq), `model` (export hf, embed, probe, stats) and `pipeline`
(run, demo); `common` declares what they share (executor options, one-line errors, the progress display).
Exit codes: 0 when the run finished (rejected inputs included), 1 when tasks failed (rerun to retry
them), 2 on misuse, with a one-line `error:` message.
"""

from __future__ import annotations

import sys

import typer

from mert_pipeline.cli import data, model, pipeline, shards, teachers
from mert_pipeline.cli.common import Command, Group, console

START = "Start here"
STEPS = "The single steps of `run`"
MODEL = "Train and use the model"

app = typer.Typer(
    name="mert-pipe",
    help="""Turn a music collection into pseudo-labelled WebDataset shards and pretrain MERT-style models.

    Start with `mert-pipe demo`: it synthesizes a small corpus and runs every step on it, in a few minutes
    on a CPU. Then `mert-pipe run MUSIC_DIR --out WORKDIR` makes verified shards of your own music, and
    `mert-pipe train --config mert_95m --shards WORKDIR/shards --out RUN_DIR` (or `torchrun
    trainer/pretrain.py` with the same options) pretrains on them. `export hf`, `embed` and `probe` use
    the trained model. Each command's --help says what it reads and writes; the README and docs/ say more.
    """,
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
kmeans_app = typer.Typer(
    help="Fit k-means centroids on features, and report on label quality.", cls=Group, no_args_is_help=True
)
export_app = typer.Typer(
    help="Write a trained model or the pipeline's outputs in other tools' formats.",
    cls=Group,
    no_args_is_help=True,
)

app.command(cls=Command, rich_help_panel=START)(pipeline.demo)
app.command(cls=Command, rich_help_panel=START)(pipeline.run)
app.command(cls=Command, rich_help_panel=START)(model.train)
app.command(cls=Command, rich_help_panel=STEPS)(data.manifest)
app.command(cls=Command, rich_help_panel=STEPS)(data.resample)
app.command(cls=Command, rich_help_panel=STEPS)(data.dedup)
app.command(cls=Command, rich_help_panel=STEPS)(teachers.features)
app.add_typer(kmeans_app, name="kmeans", rich_help_panel=STEPS)
kmeans_app.command("fit", cls=Command)(teachers.kmeans_fit)
kmeans_app.command("report", cls=Command)(teachers.kmeans_report)
app.command(cls=Command, rich_help_panel=STEPS)(teachers.tokenize)
app.command(cls=Command, rich_help_panel=STEPS)(teachers.iterate)
app.command(cls=Command, rich_help_panel=STEPS)(shards.shard)
app.command(cls=Command, rich_help_panel=STEPS)(shards.verify)
app.add_typer(export_app, name="export", rich_help_panel=MODEL)
export_app.command("hf", cls=Command)(model.export_hf)
export_app.command("fairseq", cls=Command)(shards.export_fairseq)
app.command(cls=Command, rich_help_panel=MODEL)(model.embed)
app.command(cls=Command, rich_help_panel=MODEL)(model.probe)
app.command(cls=Command, rich_help_panel=MODEL)(model.stats)


def main() -> None:
    """Entry point: usage errors become the same one-line `error:` as ours, exit code 2."""
    try:
        code = app(prog_name="mert-pipe", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):  # outside a command; inside one typer returns 130 itself
        code = 130
    except typer.TyperException as exc:  # typer's (vendored click) usage and parameter errors
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mert-pipe` or `mert-pipe manifest`
            print(exc.format_message())
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        console.print(f"[bold red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    if code == 130:  # Ctrl-C: typer exits without a word, so say how to go on
        console.print("interrupted: finished tasks are kept; rerun the same command to resume")
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
