"""Data commands: `manifest` (probe the collection), `resample` (mono 24 kHz audio), `dedup` (one copy of
each recording)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mert_pipeline import pipeline
from mert_pipeline.cli.common import errors, fail, note, progress, with_executor
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


@with_executor()
def dedup(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ (from `resample`).")],
    keep: Annotated[
        Path | None,
        typer.Option(
            "--keep",
            metavar="FILE",
            help="Ids or paths never dropped, one a line (# comments).",
        ),
    ] = None,
    min_coverage: Annotated[
        float,
        typer.Option(
            "--min-coverage",
            min=0.01,
            max=1.0,
            help="Fraction of the shorter file that must match the longer one.",
        ),
    ] = 0.8,
    max_error: Annotated[
        float,
        typer.Option(
            "--max-error", min=0.01, max=0.49, help="Bit error rate under which fingerprint items match."
        ),
    ] = 0.2,
    files_per_task: Annotated[
        int, typer.Option("--files-per-task", min=1, help="Files per fingerprint task.")
    ] = 64,
    *,
    executor: ExecutorConfig,
) -> None:
    """Find near-duplicate recordings and keep one of each: the step `run` takes after resample.

    Chromaprint fingerprints every resampled file (WORKDIR/dedup/fingerprints/, reused by reruns); pairs
    that share index keys are found by hash partition and verified by alignment. Each group keeps the
    longest file, then lossless over lossy, then the higher source rate, then the smallest id (or a file
    of --keep). The others leave WORKDIR/audio_24k/manifest.parquet and its tsv files for its
    rejects.jsonl (reason near_duplicate, naming the kept file, the overlap and the score). Writes
    WORKDIR/dedup/groups.jsonl and dedup.json. See docs/dedup.md.
    """
    from mert_pipeline.dedup import DedupSettings

    try:
        settings = DedupSettings(min_coverage=min_coverage, max_error=max_error)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    with errors():
        entries = pipeline.read_keep_list(keep) if keep else ()
        with progress() as shown:
            report = pipeline.dedup(
                workdir,
                keep=entries,
                settings=settings,
                files_per_task=files_per_task,
                executor=executor,
                progress=shown,
            )
    counts = report.summary.get("counts", {})
    note(
        f"dedup: {counts.get('files_seen', 0)} files, {counts.get('groups', 0)} groups of one recording, "
        f"{counts.get('dropped', 0)} files dropped ({counts.get('dropped_hours', 0):.3f} h), "
        f"{counts.get('accepted', 0)} kept; groups in {report.summary.get('outputs', {}).get('groups')}"
    )
    for group in report.summary.get("examples", [])[:3]:
        for item in group["dropped"][:2]:
            note(
                f"  {item['path']} -> kept {group['kept']['path']} "
                f"({item['overlap_seconds']:.1f} s overlap, score {item['score']:.3f})"
            )
