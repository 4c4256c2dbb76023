"""The whole pipeline in one command (`run`), and the demo on a corpus it synthesizes (`demo`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mert_pipeline import pipeline
from mert_pipeline.cli.common import console, errors, note, progress, with_executor
from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.manifests.records import DEFAULT_SEED


@with_executor(force=False)
def run(
    roots: Annotated[
        list[str],
        typer.Argument(
            metavar="ROOT...", help="Folders (or files) of audio to scan, recursively; or URLs (s3://...)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="WORKDIR", help="WORKDIR: where every stage writes.")],
    teachers: Annotated[
        str,
        typer.Option(
            "--teachers",
            metavar="NAMES",
            help="Label sets to make: rvq, kmeansK (MFCC k-means, e.g. kmeans500), musicK (log-CQT k-means, "
            "e.g. music500), bestrq.",
        ),
    ] = "rvq",
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards",
            metavar="SHARDS",
            help="Where the shards go, a folder or a URL (default: WORKDIR/shards).",
        ),
    ] = None,
    valid_percent: Annotated[
        float, typer.Option("--valid-percent", min=0.0, max=1.0, help="manifest: fraction in valid.")
    ] = 0.01,
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", min=0.0, help="manifest: reject shorter.")
    ] = 3.0,
    deep: Annotated[bool, typer.Option("--deep", help="manifest: decode every sample when probing.")] = False,
    fmt: Annotated[str, typer.Option("--format", metavar="flac|wav", help="resample: flac or wav.")] = "flac",
    bits: Annotated[int, typer.Option("--bits", help="resample: 16 or 24 bits.")] = 16,
    no_dedup: Annotated[
        bool, typer.Option("--no-dedup", help="dedup: keep near-duplicate recordings (the step is on).")
    ] = False,
    keep: Annotated[
        Path | None,
        typer.Option("--keep", metavar="FILE", help="dedup: ids or paths never dropped, one a line."),
    ] = None,
    codec_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--codec-checkpoint",
            metavar="FILE",
            help="rvq: the EnCodec 24 kHz weights file, for machines without internet.",
        ),
    ] = None,
    bandwidth: Annotated[
        float, typer.Option("--bandwidth", help="rvq: EnCodec kbps (6 -> 8 codebooks).")
    ] = 6.0,
    device: Annotated[
        str, typer.Option("--device", metavar="auto|cpu|cuda", help="rvq: auto, cpu or cuda.")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", metavar="DTYPE", help="rvq: float32, bfloat16 or float16.")
    ] = "float32",
    sample_frames: Annotated[
        int, typer.Option("--sample-frames", min=1, help="kmeans: frames sampled for the fit.")
    ] = 1_000_000,
    segment_seconds: Annotated[
        float, typer.Option("--segment-seconds", min=0.02, help="shard: longest segment.")
    ] = 30.0,
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="shard: close a shard at this size.")
    ] = "256MB",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, the k-means sample and the shuffle.")
    ] = DEFAULT_SEED,
    *,
    executor: ExecutorConfig,
) -> None:
    """Make verified shards of a music collection: manifest, resample, dedup, every teacher, shard, verify.

    This is the command to run on your own music. Everything it needs (the roots, the EnCodec weights,
    writable outputs) is checked before the first stage starts. Every stage is resumable: run the same
    command again after an interruption and only unfinished tasks, and tasks whose files changed, run. It
    writes WORKDIR/ as the single steps do, the shards to --shards, and WORKDIR/stats/run.json (time,
    tasks and throughput per stage, rejects by reason). Next: `mert-pipe train --shards SHARDS`.
    """
    with errors():
        config = pipeline.PipelineConfig(
            roots=tuple(roots),
            workdir=out,
            teachers=pipeline.parse_teachers(teachers),
            shards=shards,
            valid_percent=valid_percent,
            min_seconds=min_seconds,
            deep=deep,
            format=fmt,
            bits=bits,
            dedup=not no_dedup,
            keep=pipeline.read_keep_list(keep) if keep else (),
            codec_checkpoint=str(codec_checkpoint) if codec_checkpoint else None,
            bandwidth=bandwidth,
            device=device,
            dtype=dtype,
            sample_frames=sample_frames,
            segment_seconds=segment_seconds,
            shard_size=shard_size,
            seed=seed,
        )
        with progress() as shown:
            report = pipeline.run_pipeline(config, executor, shown)
    print_run(report)
    if not report.ok:
        raise typer.Exit(code=1)


def print_run(report: pipeline.PipelineReport) -> None:
    """One table for the whole run (time, tasks, throughput per stage), the rejects by reason, the verdict."""
    for problem in report.verify.problems if report.verify else []:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if report.verify is not None:
        verdict = "no problems" if report.verify.ok else f"{len(report.verify.problems)} problems"
        note(f"verify: {len(report.verify.checks)} shards re-read, {verdict}")
        for warning in report.verify.warnings:
            console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    table = Table(title="run summary", title_justify="left")
    for column in ("stage", "tasks run / done before", "files", "audio h", "seconds", "h audio / s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in report.stages:
        counts = stage.summary.get("counts", {})
        hours = counts.get("audio_seconds", 0) / 3600
        table.add_row(
            stage.stage,
            f"{stage.done} / {stage.skipped}",
            str(counts.get("files_seen", stage.stats.get("files_seen", 0))),
            f"{hours:.3f}",
            f"{stage.seconds:.1f}",
            f"{hours / max(stage.seconds, 1e-9):.3f}",
        )
    console.print(table)
    for reason, count in report.rejects.items():
        note(f"  rejected {count:6d}  {reason}")
    totals = report.totals
    console.print(
        f"[bold green]run finished[/] in {report.seconds:.1f} s: {report.files_in} files in, "
        f"{totals.get('shards', 0)} shards out ({report.hours:.3f} h, {totals.get('bytes', 0) / 1e6:.1f} MB) "
        f"in {report.shards}",
        highlight=False,
    )


@with_executor(force=False)
def demo(
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Where the synthesized corpus and WORKDIR go.")
    ] = Path("demo_work"),
    tracks: Annotated[int, typer.Option(min=2, help="How many music-like tracks to synthesize.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the synthesized corpus.")] = DEFAULT_SEED,
    train_steps: Annotated[
        int,
        typer.Option("--train-steps", min=0, help="Steps of the tiny model trained at the end (0: none)."),
    ] = 200,
    *,
    executor: ExecutorConfig,
) -> None:
    """Try everything on a small corpus this command synthesizes: no data, no cluster, no GPU needed.

    It writes OUT/corpus (synthesized music, with a few broken files so that rejects show up), runs
    `run` on it into OUT/work and OUT/shards, trains the tiny model for --train-steps (OUT/run), exports
    it (OUT/hf), probes it against its random init (OUT/probe) and writes the statistics report
    (OUT/work/stats/report). Without internet it labels with a test codec (random weights), and every
    output says so. Running it again skips finished work.
    """
    from mert_pipeline.demo import run_demo

    start = time.perf_counter()
    with errors(), progress() as shown:
        result = run_demo(
            out, tracks=tracks, seed=seed, train_steps=train_steps, executor=executor, progress=shown
        )
    print_run(result.pipeline)
    console.print(
        f"\n[bold green]demo finished[/] in {time.perf_counter() - start:.1f} s. Outputs:", highlight=False
    )
    for name, path in result.outputs.items():
        note(f"  {name:16s} {path}")
    note(
        "next, your own music: mert-pipe run MUSIC_DIR --out work (without internet, add --codec-checkpoint "
        "FILE), then mert-pipe train --config mert_95m --shards work/shards --out runs/first (README)"
    )
