"""Data commands: `manifest` (probe the collection) and `resample` (mono 24 kHz audio)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mert_pipeline import pipeline
from mert_pipeline.cli.common import errors, fail, progress, with_executor
from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.manifests.records import DEFAULT_SEED
from mert_pipeline.resample import OutputSpec
from mert_pipeline.stages.manifest import DEFAULT_EXTENSIONS


@with_executor()
def manifest(
    roots: Annotated[
        list[str],
        typer.Argument(
            metavar="ROOT...",
            help="Folders (or files) to scan, recursively, in sorted order; or URLs (s3://bucket/prefix).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", metavar="WORKDIR", help="WORKDIR that receives the manifest and all later stages."
        ),
    ],
    valid_percent: Annotated[
        float,
        typer.Option(
            "--valid-percent", min=0.0, max=1.0, help="Fraction (0-1) of files in valid.tsv, as fairseq."
        ),
    ] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the deterministic train/valid split.")] = DEFAULT_SEED,
    min_seconds: Annotated[float, typer.Option("--min-seconds", min=0.0, help="Reject shorter files.")] = 3.0,
    deep: Annotated[
        bool, typer.Option("--deep", help="Decode every sample: catches NaN/Inf and all truncations.")
    ] = False,
    extensions: Annotated[
        str, typer.Option(help="Comma-separated extensions to probe; '*' probes every file.")
    ] = ",".join(DEFAULT_EXTENSIONS),
    files_per_task: Annotated[
        int, typer.Option("--files-per-task", min=1, help="Files per task (unit of resume).")
    ] = 200,
    *,
    executor: ExecutorConfig,
) -> None:
    """Probe every audio file under ROOT... and write the manifest, rejects and fairseq tsv files to WORKDIR.

    Reads: the folders given (symlinks are not followed). Writes: WORKDIR/manifest.parquet (one record per
    accepted file), WORKDIR/rejects.jsonl (path, reason, detail for every other file), WORKDIR/train.tsv and
    valid.tsv (fairseq format), WORKDIR/stats/manifest.json.
    """
    with errors(), progress() as shown:
        pipeline.manifest(
            roots,
            out,
            valid_percent=valid_percent,
            seed=seed,
            min_seconds=min_seconds,
            deep=deep,
            extensions=tuple(extensions.split(",")),
            files_per_task=files_per_task,
            executor=executor,
            progress=shown,
        )


@with_executor()
def resample(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding manifest.parquet (from `manifest`).")],
    sample_rate: Annotated[
        int, typer.Option("--sample-rate", min=1000, max=384000, help="Target rate in Hz (MERT: 24000).")
    ] = 24000,
    fmt: Annotated[
        str, typer.Option("--format", metavar="flac|wav", help="flac (lossless, about half the size) or wav.")
    ] = "flac",
    bits: Annotated[int, typer.Option("--bits", help="16 or 24: integer sample width written.")] = 16,
    quality: Annotated[str, typer.Option("--quality", help="soxr recipe: hq or vhq.")] = "hq",
    on_silence: Annotated[
        str, typer.Option("--on-silence", help="keep (flagged in the manifest) or reject all-silent files.")
    ] = "keep",
    on_clipping: Annotated[
        str, typer.Option("--on-clipping", help="keep (flagged in the manifest) or reject clipped files.")
    ] = "keep",
    clip_fraction: Annotated[
        float,
        typer.Option(
            "--clip-fraction",
            min=0.0,
            max=1.0,
            help="A file is clipped above this fraction of full-scale samples.",
        ),
    ] = 1e-3,
    files_per_task: Annotated[
        int, typer.Option("--files-per-task", min=1, help="Files per task (unit of scheduling).")
    ] = 32,
    *,
    executor: ExecutorConfig,
) -> None:
    """Write every file of the manifest as mono audio at --sample-rate into WORKDIR/audio_24k/.

    Reads: WORKDIR/manifest.parquet. Writes: WORKDIR/audio_24k/ab/<id>.flac (one file per id),
    WORKDIR/audio_24k/manifest.parquet, rejects.jsonl, train.tsv, valid.tsv, WORKDIR/stats/resample.json.
    Channels are averaged; soxr resamples in blocks, so memory does not grow with file length.
    """
    try:
        output = OutputSpec(sample_rate=sample_rate, format=fmt.upper(), bits=bits, quality=quality.upper())
    except ValueError as exc:
        raise fail(str(exc)) from exc
    with errors(), progress() as shown:
        pipeline.resample(
            workdir,
            output=output,
            on_silence=on_silence,
            on_clipping=on_clipping,
            clip_fraction=clip_fraction,
            files_per_task=files_per_task,
            executor=executor,
            progress=shown,
        )
