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
from mert_pipeline.cli.common import console

app = typer.Typer(
    name="mert-pipe",
    help="Turn a music collection into pseudo-labelled WebDataset shards for MERT-style pretraining.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
kmeans_app = typer.Typer(help="Fit k-means centroids and report on label quality.", no_args_is_help=True)
export_app = typer.Typer(help="Write the pipeline's outputs in other tools' formats.", no_args_is_help=True)

app.command()(pipeline.run)
app.command()(pipeline.demo)
app.command()(data.manifest)
app.command()(data.resample)
app.command()(teachers.tokenize)
app.command()(teachers.features)
app.add_typer(kmeans_app, name="kmeans")
kmeans_app.command("fit")(teachers.kmeans_fit)
kmeans_app.command("report")(teachers.kmeans_report)
app.command()(shards.shard)
app.command()(shards.verify)
app.add_typer(export_app, name="export")
export_app.command("fairseq")(shards.export_fairseq)
export_app.command("hf")(model.export_hf)
app.command()(model.embed)
app.command()(model.probe)
app.command()(model.stats)


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
