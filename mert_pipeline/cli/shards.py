"""Shard commands: `shard` (WebDataset tars), `verify` (re-read them) and `export fairseq`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mert_pipeline import pipeline
from mert_pipeline.cli.common import console, errors, fail, note, progress, teacher_list, with_executor
from mert_pipeline.executor import ExecutorConfig, StageReport
from mert_pipeline.manifests.records import DEFAULT_SEED
from mert_pipeline.progress import summary_table


@with_executor()
def shard(
    workdir: Annotated[
        Path, typer.Argument(help="WORKDIR holding audio_24k/ and labels/ (from `tokenize`).")
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            metavar="SHARDS",
            help="SHARDS: where train/, valid/ and index.json go (a folder or a URL).",
        ),
    ],
    segment_seconds: Annotated[
        float,
        typer.Option(
            "--segment-seconds",
            min=0.02,
            help="Longest segment; tracks cut evenly on multiples of 20480 samples (whole FLAC frames).",
        ),
    ] = 30.0,
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="Close a shard at about this size.")
    ] = "256MB",
    shard_samples: Annotated[
        int | None, typer.Option("--shard-samples", min=1, help="Also close a shard at this many samples.")
    ] = None,
    teachers: Annotated[
        str | None,
        typer.Option(
            "--teachers",
            metavar="NAMES",
            help="Comma-separated label sets (default: every one in WORKDIR/labels).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the global shuffle of segments across shards.")
    ] = DEFAULT_SEED,
    labels_only: Annotated[
        bool, typer.Option("--labels-only", help="Add label-only sidecar shards for --teacher.")
    ] = False,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="With --labels-only: the new label set's name.")
    ] = None,
    *,
    executor: ExecutorConfig,
) -> None:
    """Write WebDataset shards of audio segments and every teacher's labels (--labels-only: sidecars).

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio, WORKDIR/labels/*/. Writes: SHARDS/{train,valid}/
    shard-NNNNNN.tar (KEY.flac, KEY.json, KEY.<teacher>.npy per sample), SHARDS/index.json (per shard:
    samples, bytes, sha256, seconds; totals; teachers), SHARDS/rejects.jsonl. With --labels-only --teacher
    NAME: SHARDS/{train,valid}/shard-NNNNNN.NAME.tar holding KEY.NAME.npy for the same keys.
    """
    if labels_only and not teacher:
        raise fail("--labels-only needs --teacher NAME")
    if teacher and not labels_only:
        raise fail("--teacher goes with --labels-only; to choose label sets use --teachers")
    with errors(), progress() as shown:
        if labels_only:
            report = pipeline.add_sidecars(workdir, out, teacher or "", executor=executor, progress=shown)
        else:
            report = pipeline.shard(
                workdir,
                out,
                teachers=teacher_list(teachers),
                segment_seconds=segment_seconds,
                shard_size=shard_size,
                shard_samples=shard_samples,
                seed=seed,
                executor=executor,
                progress=shown,
            )
    print_totals(report)


def print_totals(report: StageReport) -> None:
    totals = report.summary.get("totals", {})
    for split in ("train", "valid"):
        part = totals.get(split, {})
        note(
            f"{split}: {part.get('shards', 0)} shards, {part.get('samples', 0)} samples, "
            f"{part.get('seconds', 0) / 3600:.3f} h, {part.get('bytes', 0) / 1e6:.1f} MB "
            f"(+{part.get('sidecar_bytes', 0) / 1e6:.1f} MB sidecars)"
        )


def verify(
    shards: Annotated[str, typer.Argument(help="SHARDS folder (or URL) holding index.json (from `shard`).")],
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Processes re-reading shards (default: one per core)."),
    ] = None,
    max_problems: Annotated[
        int, typer.Option("--max-problems", min=1, help="Print at most this many problems.")
    ] = 200,
) -> None:
    """Re-read every shard: sha256 and size against index.json, every audio member decoded, label shapes,
    frame alignment, key sets (sidecars included). Exit code 1 when anything is wrong."""
    start = time.perf_counter()
    with errors(), progress() as shown:
        report = pipeline.verify(shards, workers, shown)
    seconds = time.perf_counter() - start
    for problem in report.problems[:max_problems]:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if len(report.problems) > max_problems:
        note(f"... and {len(report.problems) - max_problems} more problems")
    for warning in report.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    samples = sum(c.samples for c in report.checks)
    size = sum(c.bytes for c in report.checks)
    audio = sum(c.seconds for c in report.checks)
    note(
        f"verify: {len(report.checks)} shards, {samples} samples, {audio / 3600:.3f} h, {size / 1e6:.1f} MB "
        f"in {seconds:.2f} s ({samples / max(seconds, 1e-9):.1f} samples/s, "
        f"{size / 1e6 / max(seconds, 1e-9):.1f} MB/s): {len(report.problems)} problems"
    )
    if not report.ok:
        raise typer.Exit(code=1)


def export_fairseq(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ and labels/.")],
    out: Annotated[Path, typer.Option("--out", help="DIR: receives the tsv, label and dict files.")],
    teachers: Annotated[
        str,
        typer.Option(
            "--teachers", metavar="NAMES", help="Comma-separated label sets, e.g. rvq or rvq,kmeans500."
        ),
    ] = "rvq",
    sharding: Annotated[
        int,
        typer.Option(
            "--sharding",
            metavar="N",
            min=0,
            help="Split the train rows round-robin into N >= 2 shards train_{i}_N.* for the official "
            "task.sharding_data=N (the 330M config uses 6), instead of one train.tsv; 0: off.",
        ),
    ] = 0,
) -> None:
    """tsv manifests and label files exactly as the official MERT fairseq task reads them.

    Writes: DIR/{train,valid}.tsv (root line, then relpath<TAB>num_samples), DIR/{split}.encodec_{i} per
    EnCodec codebook and DIR/{split}.km for a single-codebook (k-means) teacher (one line of space-separated
    labels per tsv row), DIR/dict.{label}.txt (`<id> 1` lines), DIR/rejects.jsonl (rows dropped because a
    teacher has no labels for them), DIR/export.json. With --sharding N the train files are
    DIR/train_{i}_N.tsv and DIR/train_{i}_N.{label} for i < N instead of DIR/train.*.
    """
    from mert_pipeline.shards import ShardError

    names = teacher_list(teachers) or []
    start = time.perf_counter()
    try:
        with errors(), console.status("exporting"):
            summary = pipeline.export_fairseq(workdir, out, names, sharding=sharding)
    except ShardError as exc:  # labels that do not cover their audio: the data is wrong, not the call
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from exc
    report = StageReport(
        "export fairseq", 1, 1, 0, [], summary["counts"], time.perf_counter() - start, summary
    )
    console.print(summary_table(report, "files"))
    labels = ", ".join(label for group in summary["labels"].values() for label in group)
    note(f"labels: {labels} at {summary['label_rate']:g} Hz -> {out}")
    shards = summary.get("sharding", {})
    if shards.get("shards"):
        n = shards["shards"]
        note(
            f"train: {n} shards train_{{0..{n - 1}}}_{n}.* ({shards['order']}, rows {shards['rows']}); "
            f"train with task.sharding_data={n}"
        )
