"""`mert-pipe`: one sub-command per stage, each a thin wrapper over a library function.

Every stage command takes the same executor options (`--executor local|ray`, `--workers`,
`--ray-address`, `--force`), shows a progress bar on a terminal, and ends with a short summary.
Exit codes: 0 when the run finished (rejected inputs included), 1 when tasks failed (rerun to retry
them), 2 on misuse, with a one-line `error:` message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mert_pipeline import storage
from mert_pipeline.executor import ExecutorConfig, Stage, StageReport, Task, TaskOutcome, execute
from mert_pipeline.fs import WorkdirBusy, atomic_write_text, ensure_writable_dir, workdir_lock
from mert_pipeline.resample import OutputSpec
from mert_pipeline.shards import parse_size
from mert_pipeline.storage import Location, as_location
from stages.manifest import DEFAULT_EXTENSIONS, ManifestConfig, ManifestStage, inside_roots, resolve_roots
from stages.resample import ResampleConfig, ResampleStage
from stages.tokenize import (
    TeacherMismatch,
    TokenizeConfig,
    TokenizeStage,
    default_files_per_task,
    default_workers,
)

app = typer.Typer(
    name="mert-pipe",
    help="Turn a music collection into pseudo-labelled WebDataset shards for MERT-style pretraining.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
DEFAULT_WORKERS = max(1, os.cpu_count() or 1)

ExecutorOpt = Annotated[
    str,
    typer.Option("--executor", help="local: a process pool on this machine; ray: Ray tasks on a cluster."),
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=1, help="Worker processes (local) or CPUs of the local Ray started.")
]
ModelWorkersOpt = Annotated[  # stages that load a model: one worker per GPU, or one using every core
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="Worker processes (default: one per GPU; on CPU one, with a torch thread per core).",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", help="Existing Ray cluster (default: start a local one)."
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo every task, even those already complete.")]
CpusOpt = Annotated[
    float | None,
    typer.Option("--cpus-per-task", min=0.0, help="Ray: CPUs one task reserves (default: the stage's)."),
]
GpusOpt = Annotated[
    float | None,
    typer.Option(
        "--gpus-per-task",
        min=0.0,
        help="Ray: GPUs one task reserves, fractions allowed (default: the stage's).",
    ),
]
MaxRetriesOpt = Annotated[
    int, typer.Option("--max-retries", min=0, help="Ray: retries of a task whose worker process died.")
]


class UsageError(Exception):
    """Misuse the user can fix; printed as one line, exit code 2."""


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def executor_config(
    executor: str,
    workers: int,
    ray_address: str | None,
    force: bool,
    max_retries: int = 3,
    cpus_per_task: float | None = None,
    gpus_per_task: float | None = None,
) -> ExecutorConfig:
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor must be 'local' or 'ray', not {executor!r}")
    return ExecutorConfig(
        kind=executor,  # type: ignore[arg-type]
        workers=workers,
        ray_address=ray_address,
        force=force,
        max_retries=max_retries,
        cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task,
    )


_run_progress: Progress | None = None  # set by `run`: one display, a row per stage, for the whole chain


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


@contextlib.contextmanager
def _status(text: str) -> Iterator[None]:
    """A spinner for a step without tasks; inside `run`, a row of its one display (rich allows only one
    live display at a time)."""
    if _run_progress is None:
        with console.status(text):
            yield
        return
    row = _run_progress.add_task(text, total=None, unit="")
    yield
    _run_progress.update(row, total=1, completed=1)


def run_stage(stage: Stage, config: ExecutorConfig, unit: str = "files") -> StageReport:
    """Execute a stage with the workdir locked, a progress bar on terminals, and a summary at the end."""
    progress = _run_progress or _progress()
    live = contextlib.nullcontext() if progress is _run_progress else progress
    bar = progress.add_task(f"{stage.name}: planning", total=None, unit=unit)

    def on_plan(tasks: list[Task]) -> None:
        progress.update(bar, description=stage.name, total=sum(t.size for t in tasks))

    def on_task(outcome: TaskOutcome, task: Task) -> None:
        progress.advance(bar, task.size)

    try:
        with workdir_lock(stage.workdir), live:
            report = execute(stage, config, on_task=on_task, on_plan=on_plan)
    except WorkdirBusy as exc:
        raise fail(str(exc)) from exc
    print_report(report, unit)
    if not report.ok:
        for outcome in report.failed[:10]:
            console.print(
                f"[red]task {outcome.rank} failed:[/] {outcome.error}", highlight=False, soft_wrap=True
            )
        console.print(
            f"[bold red]{len(report.failed)} of {report.tasks} tasks failed[/]; tracebacks in "
            f"{stage.workdir / '.work' / stage.name / 'errors'}; rerun the same command to retry them.",
            highlight=False,
        )
        raise typer.Exit(code=1)
    return report


def print_report(report: StageReport, unit: str) -> None:
    counts = report.summary.get("counts", {})
    table = Table(title=f"{report.stage} summary", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row(
        "tasks",
        f"{report.tasks} ({report.done} run, {report.skipped} already done, {len(report.failed)} failed)",
    )
    first = ["files_seen", "accepted", "rejected"]
    for key in first + sorted(k for k in counts if k not in first):
        if key not in counts:
            continue
        value = counts[key]
        if key == "audio_seconds":
            table.add_row("audio hours", f"{value / 3600:.3f}")
        elif key == "bytes":
            table.add_row("size", f"{value / 1e6:.1f} MB")
        else:
            table.add_row(key, f"{value:g}" if isinstance(value, float) else str(value))
    seconds = max(report.seconds, 1e-9)
    seen = counts.get("files_seen", report.stats.get("files_seen", 0))
    table.add_row("wall time", f"{report.seconds:.2f} s")
    table.add_row(
        "throughput",
        f"{seen / seconds:.1f} {unit}/s, {counts.get('audio_seconds', 0) / 3600 / seconds:.4f} h audio/s",
    )
    console.print(table)


def _check_workdir(out: Path) -> Path:
    try:
        ensure_writable_dir(out)
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from exc
    return out.resolve()


def _check_roots(roots: list[str]) -> list[Location]:
    """ROOT arguments: local folders or files that exist, or fsspec URLs (s3://bucket/prefix) that hold
    something."""
    located = [as_location(root) for root in roots]
    for root in located:
        try:
            found = storage.exists(root)
        except OSError as exc:
            raise fail(str(exc)) from exc
        if not found:
            raise fail(f"root {root} does not exist")
    return located


def _shards_location(text: str) -> Location:
    """A SHARDS argument: a local folder (made absolute) or a URL, proven writable when remote."""
    location = as_location(text)
    if isinstance(location, Path):
        return location.resolve()
    try:
        storage.check_writable(location)
    except OSError as exc:
        raise fail(str(exc)) from exc
    return location


@app.command()
def manifest(
    roots: Annotated[
        list[str],
        typer.Argument(
            metavar="ROOT...",
            help="Folders (or files) to scan, recursively, in sorted order; or URLs (s3://bucket/prefix).",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="WORKDIR that receives the manifest and all later stages.")
    ],
    valid_percent: Annotated[
        float,
        typer.Option(
            "--valid-percent", min=0.0, max=1.0, help="Fraction (0-1) of files in valid.tsv, as fairseq."
        ),
    ] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the deterministic train/valid split.")] = 1317,
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
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Probe every audio file under ROOT... and write the manifest, rejects and fairseq tsv files to WORKDIR.

    Reads: the folders given (symlinks are not followed). Writes: WORKDIR/manifest.parquet (one record per
    accepted file), WORKDIR/rejects.jsonl (path, reason, detail for every other file), WORKDIR/train.tsv and
    valid.tsv (fairseq format), WORKDIR/stats/manifest.json.
    """
    try:
        config = ManifestConfig(
            roots=resolve_roots(_check_roots(roots)),
            workdir=_check_workdir(out),
            valid_percent=valid_percent,
            seed=seed,
            min_seconds=min_seconds,
            deep=deep,
            extensions=tuple(extensions.split(",")),
            files_per_task=files_per_task,
        )
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
    except (ValueError, UsageError) as exc:
        raise fail(str(exc)) from exc
    if inside_roots(str(config.workdir), config.roots):
        raise fail(f"--out {config.workdir} is inside a root; its own files would be scanned")
    run_stage(ManifestStage(config), exec_config)


def _existing_workdir(workdir: Path) -> Path:
    if not (workdir / "manifest.parquet").exists():
        raise fail(
            f"{workdir}/manifest.parquet not found: run `mert-pipe manifest ROOT... --out {workdir}` first"
        )
    return _check_workdir(workdir)


@app.command()
def resample(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding manifest.parquet (from `manifest`).")],
    sample_rate: Annotated[
        int, typer.Option("--sample-rate", min=1000, max=384000, help="Target rate in Hz (MERT: 24000).")
    ] = 24000,
    fmt: Annotated[
        str, typer.Option("--format", help="flac (lossless, about half the size) or wav.")
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
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write every file of the manifest as mono audio at --sample-rate into WORKDIR/audio_24k/.

    Reads: WORKDIR/manifest.parquet. Writes: WORKDIR/audio_24k/ab/<id>.flac (one file per id),
    WORKDIR/audio_24k/manifest.parquet, rejects.jsonl, train.tsv, valid.tsv, WORKDIR/stats/resample.json.
    Channels are averaged; soxr resamples in blocks, so memory does not grow with file length.
    """
    workdir = _existing_workdir(workdir)
    try:
        config = ResampleConfig(
            workdir=workdir,
            output=OutputSpec(
                sample_rate=sample_rate, format=fmt.upper(), bits=bits, quality=quality.upper()
            ),
            on_silence=on_silence,
            on_clipping=on_clipping,
            clip_fraction=clip_fraction,
            files_per_task=files_per_task,
        )
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
    except (ValueError, UsageError) as exc:
        raise fail(str(exc)) from exc
    run_stage(ResampleStage(config), exec_config)


TEACHERS = ("rvq", "kmeans", "bestrq")


def _existing_audio_dir(workdir: Path, sample_rate: int) -> Path:
    from stages.resample import audio_dir_name

    manifest = workdir / audio_dir_name(sample_rate) / "manifest.parquet"
    if not manifest.exists():
        raise fail(f"{manifest} not found: run `mert-pipe resample {workdir}` first")
    return _check_workdir(workdir)


def _rvq_teacher(
    bandwidth: float,
    checkpoint: Path | None,
    device: str,
    dtype: str,
    chunk_seconds: float | None,
    batch_seconds: float | None,
    workers: int,
    lock_dir: Path,
):
    """The RVQ teacher, resolved (weights loaded once here, so a missing checkpoint fails before workers
    start), with each worker's threads set so that workers x threads fits the cores."""
    from mert_pipeline.codec import BANDWIDTHS, CodecError
    from mert_pipeline.teachers import RvqTeacher

    if float(bandwidth) not in BANDWIDTHS:
        raise fail(
            f"--bandwidth must be one of {', '.join(f'{b:g}' for b in BANDWIDTHS)} kbps, not {bandwidth:g}"
        )
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device must be auto, cpu or cuda, not {device!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise fail(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    teacher = RvqTeacher(
        bandwidth=float(bandwidth),
        checkpoint=str(checkpoint.resolve()) if checkpoint is not None else None,
        device=device,
        dtype=dtype,
        chunk_seconds=chunk_seconds,
        batch_seconds=batch_seconds,
        threads=max(1, (os.cpu_count() or 1) // max(1, workers)),
        gpu_lock_dir=str(lock_dir),
    )
    try:
        return teacher.resolve()
    except (CodecError, ValueError) as exc:
        raise fail(str(exc)) from exc


def run_tokenize(config: TokenizeConfig, exec_config: ExecutorConfig) -> StageReport:
    stage = TokenizeStage(config)
    if getattr(config.teacher, "device", "cpu") != "cpu":
        from mert_pipeline.codec import resolve_device

        if resolve_device(config.teacher.device).type == "cuda":
            stage.resources = dataclasses.replace(stage.resources, gpus=1.0)
    try:
        stage.claim_labels_dir(force=exec_config.force)
    except TeacherMismatch as exc:
        raise fail(str(exc)) from exc
    return run_stage(stage, exec_config)


@app.command()
def tokenize(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ (from `resample`).")],
    teacher: Annotated[
        str, typer.Option("--teacher", help="Which teacher labels the audio: rvq, kmeans or bestrq.")
    ] = "rvq",
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Label set name, WORKDIR/labels/NAME (default: rvq, kmeans<k> or bestrq)."
        ),
    ] = None,
    centroids: Annotated[
        Path | None,
        typer.Option("--centroids", help="kmeans: (k, 39) centroids .npy (default: the last `kmeans fit`)."),
    ] = None,
    codebooks: Annotated[int, typer.Option("--codebooks", min=1, help="bestrq: random codebooks.")] = 1,
    codebook_size: Annotated[
        int, typer.Option("--codebook-size", min=2, max=32768, help="bestrq: entries per codebook.")
    ] = 4096,
    proj_dim: Annotated[int, typer.Option("--proj-dim", min=1, help="bestrq: projection dimension.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="bestrq: seed of the projection and codebooks.")] = 0,
    bandwidth: Annotated[
        float,
        typer.Option("--bandwidth", help="EnCodec kbps: 1.5, 3, 6, 12, 24 -> 2, 4, 8, 16, 32 codebooks."),
    ] = 6.0,
    codec_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--codec-checkpoint",
            help="EnCodec 24 kHz state dict to load offline (default: the encodec package's download).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="float32, or bfloat16/float16 autocast (see benchmarks/RESULTS.md)."),
    ] = "float32",
    batch_seconds: Annotated[
        float | None,
        typer.Option(
            "--batch-seconds", min=0.01, help="Audio per batch (default: 1 chunk on CPU, 64 on GPU)."
        ),
    ] = None,
    chunk_seconds: Annotated[
        float | None,
        typer.Option(
            "--chunk-seconds", min=0.1, help="Streamed chunk (exact at any length; 2.56 CPU, 10.24 GPU)."
        ),
    ] = None,
    files_per_task: Annotated[
        int | None,
        typer.Option("--files-per-task", min=1, help="Files per task (default: 4 on CPU, 256 on GPU)."),
    ] = None,
    executor: ExecutorOpt = "local",
    workers: ModelWorkersOpt = None,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Label every resampled file with a teacher: EnCodec 24 kHz RVQ codes (`--teacher rvq`), k-means on
    MFCC (`--teacher kmeans`) or BEST-RQ random-projection codes of log-mel (`--teacher bestrq`).

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio. Writes: WORKDIR/labels/NAME/ab/<id>.npy (int16,
    shape (n_q, ceil(num_samples / 320)), 75 Hz), WORKDIR/labels/NAME/labels.parquet (id, teacher, config
    hash, n_q, frames, rate), rejects.jsonl and teacher.json, WORKDIR/stats/tokenize_NAME.json.
    """
    if teacher not in TEACHERS:
        raise fail(f"--teacher must be one of {', '.join(TEACHERS)}, not {teacher!r}")
    workdir = _existing_audio_dir(workdir, 24000)
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device must be auto, cpu or cuda, not {device!r}")
    try:
        if workers is None:
            workers = default_workers(device) if teacher == "rvq" else DEFAULT_WORKERS
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
    except (UsageError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if teacher != "rvq":
        chosen = _feature_teacher(
            teacher, workdir, exec_config, centroids, codebooks, codebook_size, proj_dim, seed, workers
        )
        label_set = name or (f"kmeans{chosen.num_classes}" if teacher == "kmeans" else teacher)
        per_task = files_per_task or 16
    else:
        lock_dir = workdir / ".work" / "gpu-locks"
        chosen = _rvq_teacher(
            bandwidth, codec_checkpoint, device, dtype, chunk_seconds, batch_seconds, workers, lock_dir
        )
        label_set, per_task = name or teacher, files_per_task or default_files_per_task(chosen.device)
    try:
        config = TokenizeConfig(workdir=workdir, teacher=chosen, name=label_set, files_per_task=per_task)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    report = run_tokenize(config, exec_config)
    facts = report.summary.get("teacher", {})
    console.print(
        f"teacher {facts.get('kind')} config {facts.get('config_hash')}: {facts.get('n_q')} codebooks x "
        f"{facts.get('num_classes')} at {facts.get('label_rate'):g} Hz",
        highlight=False,
    )


def _feature_teacher(
    teacher: str,
    workdir: Path,
    exec_config: ExecutorConfig,
    centroids: Path | None,
    codebooks: int,
    codebook_size: int,
    proj_dim: int,
    seed: int,
    workers: int,
):
    """The k-means or BEST-RQ teacher, checked on the driver. BEST-RQ first runs (or resumes) its log-mel
    mean/std pass over the train files, then saves its quantizer under WORKDIR/bestrq/<hash>.npz."""
    from mert_pipeline.features import BestRQ, RunningStats
    from mert_pipeline.teachers import BestRQTeacher, KMeansTeacher
    from stages.features import STATS, FeaturesStage, log_mel_stats_config
    from stages.kmeans import KMeansInputError, last_centroids

    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    if teacher == "kmeans":
        try:
            path = centroids if centroids is not None else last_centroids(workdir)
            return KMeansTeacher(centroids=str(path.resolve()), threads=threads).resolve()
        except (KMeansInputError, ValueError) as exc:
            raise fail(str(exc)) from exc
    stats_stage = FeaturesStage(log_mel_stats_config(workdir, threads))
    run_stage(stats_stage, exec_config)
    stats = RunningStats.load(stats_stage.config.features_dir / STATS)
    if stats.count == 0:
        raise fail(f"no train files in {workdir}/audio_24k/manifest.parquet to compute log-mel statistics on")
    try:
        quantizer = BestRQ(
            stats, seed=seed, proj_dim=proj_dim, codebook_size=codebook_size, num_codebooks=codebooks
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    return BestRQTeacher.save_quantizer(quantizer, workdir / "bestrq", threads)


@app.command()
def features(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ (from `resample`).")],
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="mfcc: 39-dim MFCC+deltas at 75 Hz (HuBERT iteration 1); model: layer --layer of the "
            "trainer checkpoint --checkpoint (HuBERT iteration 2), stored as features/model_lL.",
        ),
    ] = "mfcc",
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="--kind model: a trainer checkpoint or run folder (its newest)."),
    ] = None,
    layer: Annotated[
        int | None,
        typer.Option("--layer", help="--kind model: 0 = transformer input, N = transformer layer N output."),
    ] = None,
    sample_frames: Annotated[
        int,
        typer.Option(
            "--sample-frames", min=0, help="Frames kept (uniformly, over the corpus) for `kmeans fit`."
        ),
    ] = 1_000_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the frame sample.")] = 0,
    files_per_task: Annotated[int, typer.Option("--files-per-task", min=1, help="Files per task.")] = 16,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Frame features of every resampled file, plus the frame sample and statistics `kmeans fit` uses.

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio. Writes: WORKDIR/features/NAME/ab/<id>.npy
    (float32, shape (ceil(num_samples / 320), dim)), features.parquet, rejects.jsonl, stats.npz (mean/std),
    sample.npy (at most --sample-frames frames), features.json, WORKDIR/stats/features_NAME.json; NAME is
    mfcc or model_lL.
    """
    from stages.features import FeaturesConfig, FeaturesStage

    if kind not in ("mfcc", "model"):
        raise fail(f"--kind must be mfcc or model, not {kind!r}")
    workdir = _existing_audio_dir(workdir, 24000)
    try:
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
        config = FeaturesConfig(
            workdir=workdir,
            kind=kind,
            checkpoint=str(checkpoint) if checkpoint is not None else None,
            layer=layer,
            sample_frames=sample_frames,
            seed=seed,
            files_per_task=files_per_task,
            threads=max(1, (os.cpu_count() or 1) // workers),
        )
    except (UsageError, ValueError) as exc:
        raise fail(str(exc)) from exc
    stage = FeaturesStage(config)
    if config.model is not None and config.model.device != "cpu":
        import torch

        if torch.cuda.is_available():  # Ray: a GPU per task; the local pool spreads workers over GPUs
            stage.resources = dataclasses.replace(stage.resources, gpus=1.0)
    report = run_stage(stage, exec_config)
    sample = report.summary.get("features", {}).get("sample", {})
    console.print(
        f"sample for `kmeans fit`: {sample.get('frames', 0)} of {sample.get('from_frames', 0)} frames",
        highlight=False,
    )


kmeans_app = typer.Typer(help="Fit k-means centroids and report on label quality.", no_args_is_help=True)
app.add_typer(kmeans_app, name="kmeans")


@kmeans_app.command("fit")
def kmeans_fit(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding features/FEATURES/ (from `features`).")],
    features: Annotated[str, typer.Option("--features", help="Which features: mfcc.")] = "mfcc",
    k: Annotated[
        int, typer.Option("--k", min=1, max=32768, help="Clusters (int16 labels: at most 32768).")
    ] = 500,
    sample_frames: Annotated[
        int | None,
        typer.Option("--sample-frames", min=1, help="Fit on this many frames of the sample (default: all)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsample and of the fit.")] = 0,
    backend: Annotated[
        str, typer.Option("--backend", help="faiss (default), or sklearn: fairseq's MiniBatchKMeans recipe.")
    ] = "faiss",
    name: Annotated[
        str | None, typer.Option("--name", help="Fit name: WORKDIR/kmeans/NAME (default: FEATURES_kK).")
    ] = None,
) -> None:
    """Fit k centroids on the frame sample of `mert-pipe features`; the fit becomes the default centroids of
    `tokenize --teacher kmeans`.

    Reads: WORKDIR/features/FEATURES/sample.npy. Writes: WORKDIR/kmeans/NAME/centroids.npy (float32 (k, dim)),
    WORKDIR/kmeans/NAME/fit.json (config, inertia, seconds), WORKDIR/kmeans/last.json.
    """
    from stages.kmeans import KMeansInputError, fit_from_features

    if backend not in ("faiss", "sklearn"):
        raise fail(f"--backend must be faiss or sklearn, not {backend!r}")
    if name is not None and (not name or not all(c.isalnum() or c in "-_" for c in name)):
        raise fail(f"--name must be letters, digits, '-' and '_' only, not {name!r}")
    workdir = _check_workdir(workdir)
    start = time.perf_counter()
    try:
        with workdir_lock(workdir), console.status(f"fitting k={k} on {features} frames ({backend})"):
            fit = fit_from_features(workdir, features, k, sample_frames, seed, backend, name)  # type: ignore[arg-type]
    except (KMeansInputError, WorkdirBusy) as exc:
        raise fail(str(exc)) from exc
    table = Table(title="kmeans fit summary", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("name", "k", "backend", "seed", "sample_frames", "sample_available", "inertia_per_frame"):
        value = fit[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("fit time", f"{fit['fit_seconds']:.2f} s")
    seconds = time.perf_counter() - start
    table.add_row("wall time", f"{seconds:.2f} s ({fit['sample_frames'] / seconds:,.0f} frames/s)")
    table.add_row("centroids", fit["centroids"])
    console.print(table)


@kmeans_app.command("report")
def kmeans_report(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding labels/ (from `tokenize`).")],
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="Label set to report on (default: every k-means label set)."),
    ] = None,
) -> None:
    """Cluster usage (clusters used, perplexity) of a label set and its agreement (mutual information,
    purity) with every other label set on the files both labelled, as fairseq's measure_teacher_quality.

    Reads: WORKDIR/labels/*/. Writes: WORKDIR/labels/NAME/report.json.
    """
    from stages.kmeans import KMeansInputError, label_report

    workdir = _check_workdir(workdir)
    start = time.perf_counter()
    try:
        with console.status("reading labels"):
            reports = label_report(workdir, teacher)
    except KMeansInputError as exc:
        raise fail(str(exc)) from exc
    frames = 0
    for name, report in reports.items():
        usage = Table(title=f"{name}: cluster usage ({report['files']} files)", title_justify="left")
        for column in ("codebook", "frames", "used", "perplexity", "entropy bits"):
            usage.add_column(column, justify="right")
        for row in report["usage"]:
            usage.add_row(
                str(row["codebook"]), str(row["frames"]), f"{row['used']} / {report['num_classes']}",
                f"{row['perplexity']:.1f}", f"{row['entropy_bits']:.3f}",
            )  # fmt: skip
            frames += row["frames"]
        console.print(usage)
        if report["agreement"]:
            agree = Table(
                title=f"t = {name} against each other label set o (codebook 0; MI in bits)",
                title_justify="left",
            )
            for column in ("o", "frames", "MI", "MI/H(t)", "MI/H(o)", "NMI", "pur(o|t)", "pur(t|o)"):
                agree.add_column(column, justify="right")
            for other, m in report["agreement"].items():
                agree.add_row(
                    other, str(m["frames"]), f"{m['mutual_information']:.3f}",
                    f"{m['mi_over_entropy_a']:.3f}", f"{m['mi_over_entropy_b']:.3f}", f"{m['nmi']:.3f}",
                    f"{m['purity_b_given_a']:.3f}", f"{m['purity_a_given_b']:.3f}",
                )  # fmt: skip
            console.print(agree)
        console.print(f"report: {workdir / 'labels' / name / 'report.json'}", highlight=False)
    seconds = time.perf_counter() - start
    console.print(
        f"{len(reports)} label sets, {frames} frames counted in {seconds:.2f} s "
        f"({frames / max(seconds, 1e-9):,.0f} frames/s)",
        highlight=False,
    )


def _teacher_list(text: str | None) -> list[str] | None:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


def run_shard(stage: Stage, exec_config: ExecutorConfig) -> StageReport:
    """Run a shard stage; its own input errors (missing labels, misaligned frames) are one-line errors."""
    try:
        ensure_writable_dir(stage.workdir)
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from exc
    try:
        report = run_stage(stage, exec_config, unit="files" if stage.name == "shard" else "shards")
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    totals = report.summary.get("totals", {})
    for split in ("train", "valid"):
        part = totals.get(split, {})
        console.print(
            f"{split}: {part.get('shards', 0)} shards, {part.get('samples', 0)} samples, "
            f"{part.get('seconds', 0) / 3600:.3f} h, {part.get('bytes', 0) / 1e6:.1f} MB "
            f"(+{part.get('sidecar_bytes', 0) / 1e6:.1f} MB sidecars)",
            highlight=False,
        )
    return report


@app.command()
def shard(
    workdir: Annotated[
        Path, typer.Argument(help="WORKDIR holding audio_24k/ and labels/ (from `tokenize`).")
    ],
    out: Annotated[
        str,
        typer.Option("--out", help="SHARDS: where train/, valid/ and index.json go (a folder or a URL)."),
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
        typer.Option("--teachers", help="Comma-separated label sets (default: every one in WORKDIR/labels)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the global shuffle of segments across shards.")] = 0,
    labels_only: Annotated[
        bool, typer.Option("--labels-only", help="Add label-only sidecar shards for --teacher.")
    ] = False,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="With --labels-only: the new label set's name.")
    ] = None,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write WebDataset shards of audio segments and every teacher's labels (--labels-only: sidecars).

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio, WORKDIR/labels/*/. Writes: SHARDS/{train,valid}/
    shard-NNNNNN.tar (KEY.flac, KEY.json, KEY.<teacher>.npy per sample), SHARDS/index.json (per shard:
    samples, bytes, sha256, seconds; totals; teachers), SHARDS/rejects.jsonl. With --labels-only --teacher
    NAME: SHARDS/{train,valid}/shard-NNNNNN.NAME.tar holding KEY.NAME.npy for the same keys.
    """
    from stages.shard import ShardConfig, ShardStage, SidecarConfig, SidecarStage

    workdir = _existing_audio_dir(workdir, 24000)
    try:
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
        stage: Stage
        if labels_only:
            if not teacher:
                raise UsageError("--labels-only needs --teacher NAME")
            stage = SidecarStage(SidecarConfig(workdir=workdir, out=_shards_location(out), teacher=teacher))
        else:
            if teacher:
                raise UsageError("--teacher goes with --labels-only; to choose label sets use --teachers")
            names = _teacher_list(teachers)
            stage = ShardStage(
                ShardConfig(
                    workdir=workdir,
                    out=_shards_location(out),
                    teachers=tuple(names) if names else None,
                    segment_seconds=segment_seconds,
                    shard_bytes=parse_size(shard_size),
                    shard_samples=shard_samples,
                    seed=seed,
                )
            )
    except (ValueError, UsageError) as exc:
        raise fail(str(exc)) from exc
    run_shard(stage, exec_config)


@app.command()
def verify(
    shards: Annotated[str, typer.Argument(help="SHARDS folder (or URL) holding index.json (from `shard`).")],
    workers: WorkersOpt = DEFAULT_WORKERS,
    max_problems: Annotated[
        int, typer.Option("--max-problems", min=1, help="Print at most this many problems.")
    ] = 200,
) -> None:
    """Re-read every shard: sha256 and size against index.json, every audio member decoded, label shapes,
    frame alignment, key sets (sidecars included). Exit code 1 when anything is wrong."""
    from mert_pipeline.shards import verify_all

    location = as_location(shards)
    try:
        if not storage.exists(storage.join(location, "index.json")):
            raise fail(f"{storage.join(location, 'index.json')} not found: run `mert-pipe shard` first")
    except OSError as exc:
        raise fail(str(exc)) from exc
    shards = location  # type: ignore[assignment]
    start = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]verify[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
        TimeElapsedColumn(), console=console, disable=not console.is_terminal,
    )  # fmt: skip
    with progress:
        bar = progress.add_task("verify", total=None)
        report = verify_all(shards, workers, on_shard=lambda check: progress.advance(bar))
    seconds = time.perf_counter() - start
    for problem in report.problems[:max_problems]:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if len(report.problems) > max_problems:
        console.print(f"... and {len(report.problems) - max_problems} more problems", highlight=False)
    samples = sum(c.samples for c in report.checks)
    size = sum(c.bytes for c in report.checks)
    audio = sum(c.seconds for c in report.checks)
    console.print(
        f"verify: {len(report.checks)} shards, {samples} samples, {audio / 3600:.3f} h, {size / 1e6:.1f} MB "
        f"in {seconds:.2f} s ({samples / max(seconds, 1e-9):.1f} samples/s, "
        f"{size / 1e6 / max(seconds, 1e-9):.1f} MB/s): {len(report.problems)} problems",
        highlight=False,
    )
    if not report.ok:
        raise typer.Exit(code=1)


export_app = typer.Typer(help="Write the pipeline's outputs in other tools' formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("fairseq")
def export_fairseq_command(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ and labels/.")],
    out: Annotated[Path, typer.Option("--out", help="DIR: receives the tsv, label and dict files.")],
    teachers: Annotated[
        str, typer.Option("--teachers", help="Comma-separated label sets, e.g. rvq or rvq,kmeans500.")
    ] = "rvq",
) -> None:
    """tsv manifests and label files exactly as the official MERT fairseq task reads them.

    Writes: DIR/{train,valid}.tsv (root line, then relpath<TAB>num_samples), DIR/{split}.encodec_{i} per
    EnCodec codebook and DIR/{split}.km for a single-codebook (k-means) teacher (one line of space-separated
    labels per tsv row), DIR/dict.{label}.txt (`<id> 1` lines), DIR/rejects.jsonl (rows dropped because a
    teacher has no labels for them), DIR/export.json.
    """
    from mert_pipeline.shards import ShardError
    from stages.export import export_fairseq

    workdir = _existing_audio_dir(workdir, 24000)
    names = _teacher_list(teachers)
    if not names:
        raise fail("--teachers needs at least one label set")
    _check_workdir(out)
    start = time.perf_counter()
    try:
        with console.status("exporting"):
            summary = export_fairseq(workdir, out.resolve(), names)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from exc
    except ShardError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from exc
    report = StageReport(
        "export fairseq", 1, 1, 0, [], summary["counts"], time.perf_counter() - start, summary
    )
    print_report(report, "files")
    labels = ", ".join(label for group in summary["labels"].values() for label in group)
    console.print(f"labels: {labels} at {summary['label_rate']:g} Hz -> {out}", highlight=False)


# --- use the model: export hf, stats, probe, embed (library code in hf_export, report, probe, embed) ---


@export_app.command("hf")
def export_hf_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Trainer checkpoint (ckpt-*.pt) or run folder (newest).")
    ],
    out: Annotated[
        Path, typer.Argument(help="DIR for config.json, model.safetensors, preprocessor_config.json.")
    ],
    verify: Annotated[
        bool,
        typer.Option("--verify/--no-verify", help="Load DIR with transformers and compare hidden states."),
    ] = True,
) -> None:
    """A directory plain `transformers` loads with no remote code: AutoModel.from_pretrained(DIR) is a
    HubertModel whose hidden states equal the trained encoder's. Training-only parts are dropped, listed."""
    from mert_pipeline.hf_export import CheckpointError, export_hf

    _check_workdir(out)
    start = time.perf_counter()
    try:
        with console.status("exporting"):
            summary = export_hf(checkpoint, out.resolve(), verify=verify)
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    console.print(
        f"export hf: step {summary['step']} of {summary['checkpoint']}: {summary['parameters'] / 1e6:.2f}M "
        f"parameters in {summary['kept_tensors']} tensors -> {out} "
        f"({'pre-LN' if summary['do_stable_layer_norm'] else 'post-LN'}, "
        f"{summary['feat_extract_norm']} norm)",
        highlight=False,
    )
    for name, shape in summary["dropped"].items():
        console.print(f"  dropped (training only): {name} {tuple(shape)}", highlight=False)
    check = summary["max_abs_diff"]
    verdict = "not checked (--no-verify)" if check is None else f"max |diff| {check:.2e} over all layers"
    console.print(f"transformers round trip: {verdict}; {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
def stats(
    source: Annotated[
        str, typer.Argument(help="WORKDIR (manifest.parquet) or SHARDS (index.json; a folder or a URL).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Report folder (default: WORKDIR/stats/report or SHARDS/report; needed for a URL)."
        ),
    ] = None,
) -> None:
    """Hours, files, rejects by reason, durations, per-teacher codebook usage and perplexity, label entropy
    and mutual information between teachers: OUT/report.md with PNG plots, OUT/stats.json."""
    from mert_pipeline.report import write_report

    location = as_location(source)
    if isinstance(location, Path):
        if not location.is_dir():
            raise fail(f"{source} is not a folder")
        location = location.resolve()
        shards = not (location / "manifest.parquet").exists()
        target = (out or (location / "report" if shards else location / "stats" / "report")).resolve()
    elif out is None:
        raise fail(f"{source} is remote: give --out, a local folder for the report")
    else:
        target = out.resolve()
    _check_workdir(target)
    start = time.perf_counter()
    try:
        with console.status("reading labels"):
            result = write_report(location, target)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise fail(str(exc)) from exc
    rejects = sum(n for group in result["rejects"].values() for n in group.values())
    count = result.get("segments", result["files"])
    unit = "segments" if result["kind"] == "shards" else "files"
    console.print(
        f"stats: {result['hours']:.3f} h in {count} {unit}, "
        f"{rejects} rejects, {len(result['teachers'])} teachers, in {time.perf_counter() - start:.1f} s",
        highlight=False,
    )
    for name, facts in result["teachers"].items():
        used = [row for row in facts["codebooks"] if row is not None]
        if used:
            console.print(
                f"  {name}: codebook 0 uses {used[0]['used']}/{facts['num_classes']} codes, perplexity "
                f"{used[0]['perplexity']:.1f}, entropy {used[0]['entropy_bits']:.2f} bits",
                highlight=False,
            )
    for pair, metrics in result["agreement"].items():
        console.print(
            f"  {pair.replace('~', ' vs ')}: MI {metrics['mutual_information']:.3f} bits, "
            f"NMI {metrics['nmi']:.3f}",
            highlight=False,
        )
    console.print(f"report: {result['outputs']['report']} (plots beside it)", highlight=False)


DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]
ModelOpt = Annotated[
    Path, typer.Option("--checkpoint", help="Trainer checkpoint, run folder, or `export hf` directory.")
]


def _embedder(checkpoint: Path, device: str, random_init: bool = False, seed: int = 0):
    from mert_pipeline.embed import load_embedder
    from mert_pipeline.hf_export import CheckpointError

    try:
        return load_embedder(checkpoint, device, random_init=random_init, seed=seed)
    except (CheckpointError, ValueError, OSError) as exc:
        raise fail(str(exc).splitlines()[0]) from exc


@app.command()
def probe(
    checkpoint: ModelOpt,
    data: Annotated[
        str,
        typer.Option(
            "--data", help="builtin:pitch, builtin:timbre, a CSV (path,label) or a folder per class."
        ),
    ] = "builtin:pitch",
    out: Annotated[Path, typer.Option("--out", help="Folder for probe.json and probe.png.")] = Path("probe"),
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also probe a random init of the same model.")
    ] = True,
    per_class: Annotated[int, typer.Option("--per-class", min=2, help="builtin: clips per class.")] = 16,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.05, max=0.9)] = 0.25,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, the builtin data, the baseline.")
    ] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """MARBLE-style linear probe: mean-pooled embeddings of every layer, a logistic regression per layer on
    a stratified held-out split; accuracy per layer, best layer, OUT/probe.png and OUT/probe.json."""
    from mert_pipeline.probe import linear_probe, load_probe_data, plot_accuracy, pooled_features

    try:
        dataset = load_probe_data(data, per_class=per_class, seed=seed)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    if len(set(dataset.labels)) < 2:
        raise fail(f"{data}: fewer than two classes with readable audio")
    _check_workdir(out)
    models = {"trained": _embedder(checkpoint, device)}
    if baseline:
        models["random init"] = _embedder(checkpoint, device, random_init=True, seed=seed)
    start = time.perf_counter()
    results = {}
    for name, embedder in models.items():
        with console.status(f"probe: embedding {len(dataset.audio)} clips ({name})"):
            features = pooled_features(embedder, dataset.audio)
        results[name] = linear_probe(features, dataset.labels, test_fraction=test_fraction, seed=seed)
    plot_accuracy(results, out / "probe.png", f"linear probe: {dataset.name}")
    summary = {
        "checkpoint": str(checkpoint),
        "data": dataset.name,
        "clips": len(dataset.audio),
        "rejects": dataset.rejects,
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_text(out / "probe.json", json.dumps(summary, indent=1) + "\n")
    for reject in dataset.rejects[:10]:
        console.print(f"[yellow]reject:[/] {reject['path']}: {reject['detail']}", highlight=False)
    for name, result in results.items():
        layers = " ".join(f"{a:.2f}" for a in result["accuracy"])
        console.print(
            f"probe {dataset.name} ({name}): best layer {result['best_layer']} accuracy "
            f"{result['best_accuracy']:.3f} (chance {result['chance']:.3f}); by layer: {layers}",
            highlight=False,
        )
    console.print(
        f"probe: {len(dataset.audio)} clips, {len(dataset.rejects)} rejects, {summary['seconds']:.1f} s -> "
        f"{out / 'probe.json'}, {out / 'probe.png'}",
        highlight=False,
    )


@app.command()
def embed(
    source: Annotated[
        str,
        typer.Argument(
            help="Audio file, folder, manifest.parquet, fairseq train.tsv, a .txt list of paths, or a URL "
            "(s3://bucket/prefix)."
        ),
    ],
    checkpoint: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for <id>.npy, rejects.jsonl, embed.json.")],
    layers: Annotated[
        str, typer.Option("--layers", help="all (0..L, 0 = input to layer 1), L, or L1,L2,...")
    ] = "all",
    pool: Annotated[
        str, typer.Option("--pool", help="mean: (layers, D) per file; none: (layers, T, D).")
    ] = "mean",
    chunk_seconds: Annotated[
        float, typer.Option("--chunk-seconds", min=0.02, help="Long files are cut into chunks this long.")
    ] = 30.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Chunks per forward pass.")] = 8,
    device: DeviceOpt = "auto",
    files_per_task: Annotated[
        int | None,
        typer.Option("--files-per-task", min=1, help="Files per task (default: 8 on CPU, 64 on GPU)."),
    ] = None,
    executor: ExecutorOpt = "local",
    workers: ModelWorkersOpt = None,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Per-file embeddings (float32 .npy) of any audio (any rate: resampled to 24 kHz with soxr), batched,
    on the GPU when present, on a local process pool or Ray (each worker loads the model once). Finished
    tasks are skipped (--force redoes them); unreadable files go to OUT/rejects.jsonl with a reason.

    Writes: OUT/<id>.npy, OUT/rejects.jsonl, OUT/embed.json, OUT/stats/embed.json."""
    from mert_pipeline.embed import resolve_device
    from mert_pipeline.hf_export import CheckpointError
    from stages.embed import EmbedConfig, EmbedStage

    located = _check_roots([source])[0]
    out = _check_workdir(out)
    try:
        cuda = resolve_device(device).type == "cuda"
        workers = workers or default_workers(device)
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
        config = EmbedConfig(
            inputs=located.resolve() if isinstance(located, Path) else located,
            out=out,
            checkpoint=checkpoint,
            layers=layers,
            pool=pool,
            chunk_seconds=chunk_seconds,
            batch_size=batch_size,
            device=device,
            files_per_task=files_per_task or (64 if cuda else 8),
            threads=max(1, (os.cpu_count() or 1) // workers),
        )
        stage = EmbedStage(config)  # loads the model once here: a bad checkpoint fails before any worker
    except (UsageError, CheckpointError, ValueError, OSError) as exc:
        raise fail(str(exc).splitlines()[0]) from exc
    try:
        report = run_stage(stage, exec_config)
    except (ValueError, OSError, KeyError) as exc:  # listing the inputs: an unreadable list or manifest
        raise fail(str(exc).splitlines()[0]) from exc
    counts, speed = report.summary["counts"], report.summary["throughput"]
    console.print(
        f"embed: {counts['accepted']} files, {counts['rejected']} rejected, {counts['audio_seconds']:.1f} s "
        f"of audio, {speed['x_real_time']:g}x real time per worker on {report.summary['device']} -> "
        f"{out}/<id>.npy",
        highlight=False,
    )


def _teacher_specs(text: str) -> list[tuple[str, int]]:
    """`rvq,kmeans500,bestrq` -> [("rvq", 0), ("kmeans", 500), ("bestrq", 0)]; a one-line error otherwise."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        k = item[len("kmeans") :]
        if item in ("rvq", "bestrq"):
            specs.append((item, 0))
        elif item.startswith("kmeans") and k.isdigit() and int(k) >= 2:
            specs.append(("kmeans", int(k)))
        else:
            raise UsageError(
                f"--teachers takes rvq, kmeansK (K >= 2, e.g. kmeans500) and bestrq, not {item!r}"
            )
    if not specs or len({s for s, _ in specs}) != len(specs):
        raise UsageError("--teachers must name each teacher once")
    return specs


@app.command()
def run(
    roots: Annotated[
        list[str],
        typer.Argument(
            metavar="ROOT...", help="Folders (or files) of audio to scan, recursively; or URLs (s3://...)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="WORKDIR of every stage.")],
    teachers: Annotated[
        str, typer.Option("--teachers", help="Label sets to make: rvq, kmeansK (e.g. kmeans500), bestrq.")
    ] = "rvq",
    shards: Annotated[
        str | None,
        typer.Option("--shards", help="Where the shards go, a folder or a URL (default: WORKDIR/shards)."),
    ] = None,
    valid_percent: Annotated[
        float, typer.Option("--valid-percent", min=0.0, max=1.0, help="manifest: fraction in valid.")
    ] = 0.01,
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", min=0.0, help="manifest: reject shorter.")
    ] = 3.0,
    deep: Annotated[bool, typer.Option("--deep", help="manifest: decode every sample when probing.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="resample: flac or wav.")] = "flac",
    bits: Annotated[int, typer.Option("--bits", help="resample: 16 or 24 bits.")] = 16,
    codec_checkpoint: Annotated[
        Path | None, typer.Option("--codec-checkpoint", help="rvq: EnCodec 24 kHz state dict (offline).")
    ] = None,
    bandwidth: Annotated[
        float, typer.Option("--bandwidth", help="rvq: EnCodec kbps (6 -> 8 codebooks).")
    ] = 6.0,
    device: Annotated[str, typer.Option("--device", help="rvq: auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="rvq: float32, bfloat16 or float16.")] = "float32",
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
    ] = 0,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    gpus_per_task: GpusOpt = None,
) -> None:
    """The whole pipeline in one command: manifest -> resample -> every teacher -> shard -> verify.

    Each stage is resumable: rerunning the same command skips finished work (a changed option or input
    redoes only what it affects). Reads: the audio under ROOT.... Writes: WORKDIR/ as the single stages
    do, shards to --shards, and WORKDIR/stats/run.json (time, tasks and throughput per stage, rejects by
    reason).
    """
    from mert_pipeline.shards import verify_all
    from mert_pipeline.teachers import KMeansTeacher
    from stages.features import FeaturesConfig, FeaturesStage
    from stages.kmeans import fit_from_features
    from stages.shard import ShardConfig, ShardStage

    located = _check_roots(roots)
    shard_target = _shards_location(shards) if shards else None  # a bad bucket fails now, not in an hour
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device must be auto, cpu or cuda, not {device!r}")
    try:
        specs = _teacher_specs(teachers)
        exec_config = executor_config(executor, workers, ray_address, False, max_retries, None, gpus_per_task)
        manifest_config = ManifestConfig(
            roots=resolve_roots(located),
            workdir=_check_workdir(out),
            valid_percent=valid_percent,
            seed=seed,
            min_seconds=min_seconds,
            deep=deep,
        )
        spec = OutputSpec(sample_rate=24000, format=fmt.upper(), bits=bits)  # type: ignore[arg-type]
        shard_bytes = parse_size(shard_size)
    except (UsageError, ValueError) as exc:
        raise fail(str(exc)) from exc
    workdir = manifest_config.workdir
    if inside_roots(str(workdir), manifest_config.roots):
        raise fail(f"--out {workdir} is inside a root; its own files would be scanned")
    start = time.perf_counter()
    global _run_progress
    _run_progress = _progress()
    try:
        with _run_progress:
            reports: list[StageReport] = [run_stage(ManifestStage(manifest_config), exec_config)]
            reports.append(
                run_stage(ResampleStage(ResampleConfig(workdir=workdir, output=spec)), exec_config)
            )
            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
            names = []
            for kind, k in specs:
                if kind == "rvq":
                    teacher = _rvq_teacher(
                        bandwidth,
                        codec_checkpoint,
                        device,
                        dtype,
                        None,
                        None,
                        workers,
                        workdir / ".work/gpu-locks",
                    )
                    per_task = default_files_per_task(teacher.device)
                elif kind == "kmeans":
                    features = FeaturesConfig(
                        workdir=workdir, sample_frames=sample_frames, seed=seed, threads=threads
                    )
                    reports.append(run_stage(FeaturesStage(features), exec_config))
                    with _status(f"kmeans fit: k={k}"):
                        fit = fit_from_features(workdir, "mfcc", k, seed=seed, name=f"mfcc_k{k}")
                    teacher, per_task = (
                        KMeansTeacher(centroids=fit["centroids"], threads=threads).resolve(),
                        16,
                    )
                else:
                    teacher = _feature_teacher(
                        "bestrq", workdir, exec_config, None, 1, 4096, 16, seed, workers
                    )
                    per_task = 16
                name = f"kmeans{k}" if kind == "kmeans" else kind
                names.append(name)
                config = TokenizeConfig(workdir=workdir, teacher=teacher, name=name, files_per_task=per_task)
                reports.append(run_tokenize(config, exec_config))
            shard_out = shard_target or (workdir / "shards").resolve()
            shard_config = ShardConfig(
                workdir=workdir,
                out=shard_out,
                teachers=tuple(names),
                segment_seconds=segment_seconds,
                shard_bytes=shard_bytes,
                seed=seed,
            )
            reports.append(run_shard(ShardStage(shard_config), exec_config))
    finally:
        _run_progress = None
    checked = verify_all(shard_out, workers)
    for problem in checked.problems:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    verdict = "no problems" if checked.ok else f"{len(checked.problems)} problems"
    console.print(f"verify: {len(checked.checks)} shards re-read, {verdict}", highlight=False)
    _run_summary(reports, workdir, shard_out, time.perf_counter() - start)
    if not checked.ok:
        raise typer.Exit(code=1)


def _run_summary(reports: list[StageReport], workdir: Path, shard_out: Location, seconds: float) -> None:
    """One table for the whole run (time, tasks, throughput per stage), rejects by reason, and the same
    facts in WORKDIR/stats/run.json."""
    from mert_pipeline.fs import atomic_write_json

    table = Table(title="run summary", title_justify="left")
    for column in ("stage", "tasks run / done before", "files", "audio h", "seconds", "h audio / s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    rejects: dict[str, int] = {}
    stages = []
    for report in reports:
        counts = report.summary.get("counts", {})
        hours = counts.get("audio_seconds", 0) / 3600
        for key, value in counts.items():
            if key.startswith("rejected."):
                reason = f"{report.stage}: {key.removeprefix('rejected.')}"
                rejects[reason] = rejects.get(reason, 0) + int(value)
        table.add_row(
            report.stage,
            f"{report.done} / {report.skipped}",
            str(counts.get("files_seen", report.stats.get("files_seen", 0))),
            f"{hours:.3f}",
            f"{report.seconds:.1f}",
            f"{hours / max(report.seconds, 1e-9):.3f}",
        )
        tasks = {"total": report.tasks, "done": report.done, "skipped": report.skipped}
        stages.append({"stage": report.stage, "seconds": report.seconds, "tasks": tasks, "counts": counts})
    console.print(table)
    for reason, count in sorted(rejects.items()):
        console.print(f"  rejected {count:6d}  {reason}", highlight=False)
    totals = reports[-1].summary.get("totals", {}).get("all", {})
    files_in = reports[0].summary.get("counts", {}).get("accepted", 0)
    console.print(
        f"[bold green]run finished[/] in {seconds:.1f} s: {files_in} files in, "
        f"{totals.get('shards', 0)} shards out ({totals.get('seconds', 0) / 3600:.3f} h, "
        f"{totals.get('bytes', 0) / 1e6:.1f} MB) in {shard_out}",
        highlight=False,
    )
    atomic_write_json(
        workdir / "stats" / "run.json",
        {"seconds": round(seconds, 3), "stages": stages, "rejects": rejects, "shards": str(shard_out)},
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the synthesized corpus and WORKDIR go.")] = Path(
        "demo_work"
    ),
    tracks: Annotated[int, typer.Option(min=2, help="How many music-like tracks to synthesize.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the synthesized corpus.")] = 0,
    train_steps: Annotated[
        int,
        typer.Option("--train-steps", min=0, help="Steps of the tiny model trained at the end (0: none)."),
    ] = 200,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run every stage that exists on a small corpus this command synthesizes itself (no data, no cluster).

    Writes OUT/corpus (synthesized audio, including a few broken files so rejects show up) and
    OUT/work (the WORKDIR of every stage). Then trains the tiny model for --train-steps on the shards
    (OUT/run), exports it (OUT/hf), probes it against a random init (OUT/probe) and writes the statistics
    report (OUT/work/stats/report). Rerunning skips finished work.
    """
    from mert_pipeline.synth import synthesize_demo_corpus

    out = out.resolve()
    corpus, workdir = out / "corpus", out / "work"
    _check_workdir(out)
    start = time.perf_counter()
    done_flag = out / ".corpus-complete"  # outside the corpus, which is scanned
    if not done_flag.exists():
        with console.status("synthesizing the demo corpus"):
            synthesize_demo_corpus(
                corpus, n_tracks=tracks, seed=seed, with_bad_files=True, with_edge_cases=True
            )
        atomic_write_text(done_flag, f"tracks={tracks} seed={seed}\n")
    console.print(f"corpus: {corpus}", highlight=False)
    try:
        exec_config = executor_config(executor, workers, ray_address, force=False)
    except UsageError as exc:
        raise fail(str(exc)) from exc
    config = ManifestConfig(
        roots=resolve_roots([corpus]), workdir=_check_workdir(workdir), valid_percent=0.1, files_per_task=8
    )
    outputs = dict(run_stage(ManifestStage(config), exec_config).summary["outputs"])
    resample_config = ResampleConfig(workdir=config.workdir, files_per_task=4)
    outputs.update(run_stage(ResampleStage(resample_config), exec_config).summary["outputs"])
    checkpoint = _demo_codec(out)
    rvq = _rvq_teacher(
        6.0, checkpoint, "auto", "float32", None, None, workers, workdir / ".work" / "gpu-locks"
    )
    tokenize_config = TokenizeConfig(workdir=config.workdir, teacher=rvq, name="rvq", files_per_task=4)
    outputs.update(run_tokenize(tokenize_config, exec_config).summary["outputs"])
    outputs.update(_demo_kmeans(config.workdir, exec_config, workers))
    from mert_pipeline.shards import verify_all
    from stages.shard import ShardConfig, ShardStage

    shard_config = ShardConfig(
        workdir=config.workdir, out=out / "shards", segment_seconds=10.0, shard_bytes=4 * 10**6
    )
    outputs.update(run_shard(ShardStage(shard_config), exec_config).summary["outputs"])
    checked = verify_all(shard_config.out, workers)
    for problem in checked.problems:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if not checked.ok:
        raise typer.Exit(code=1)
    console.print(f"verify: {len(checked.checks)} shards re-read, no problems", highlight=False)
    if train_steps:
        outputs.update(_demo_model(out, config.workdir, shard_config.out, train_steps))
    console.print(
        f"\n[bold green]demo finished[/] in {time.perf_counter() - start:.1f} s. Outputs:", highlight=False
    )
    for name, path in outputs.items():
        console.print(f"  {name:16s} {path}", highlight=False)


def _demo_model(out: Path, workdir: Path, shards: Path, steps: int) -> dict[str, str]:
    """Train the tiny model for `steps` in this process (one rank, CPU or one GPU; its log in
    OUT/run/train.log), export it, probe it against a random init on builtin:pitch, write the stats."""
    import contextlib

    import torch

    from mert_pipeline.hf_export import export_hf
    from mert_pipeline.probe import builtin_task, linear_probe, plot_accuracy, pooled_features
    from mert_pipeline.report import write_report
    from trainer import pretrain

    if not torch.cuda.is_available():  # a tiny model gains nothing from threads, and loses much on a busy CPU
        torch.set_num_threads(1)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = Path(pretrain.__file__).parent / "configs" / "tiny.yaml"
    args = ["--config", str(config), "--shards", str(shards), "--out", str(run_dir), "--resume"]
    args += [f"max_steps={steps}", f"warmup_steps={max(1, steps // 4)}", "eval_interval=0", "keep_last=1"]
    args += [f"ckpt_interval={steps}", f"log_interval={max(1, steps // 2)}"]
    start = time.perf_counter()
    with (
        console.status(f"training the tiny model for {steps} steps"),
        (run_dir / "train.log").open("a") as log,
    ):
        with contextlib.redirect_stdout(log):
            code = pretrain.main(args)
    if code:
        raise fail(f"training failed (exit {code}); see {run_dir / 'train.log'}")
    last = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()][-1]
    console.print(
        f"train: {steps} steps of the tiny model in {time.perf_counter() - start:.1f} s, "
        f"loss {last.get('loss', float('nan')):.3f} -> {run_dir}",
        highlight=False,
    )
    hf_dir = out / "hf"
    exported = export_hf(run_dir, hf_dir)
    console.print(
        f"export hf: {exported['parameters'] / 1e6:.2f}M parameters, dropped "
        f"{', '.join(exported['dropped'])}; transformers round trip max |diff| "
        f"{exported['max_abs_diff']:.1e}",
        highlight=False,
    )
    task = builtin_task("pitch", per_class=4)
    results = {}
    for name, random_init in (("trained", False), ("random init", True)):
        embedder = _embedder(hf_dir, "auto", random_init=random_init)
        results[name] = linear_probe(pooled_features(embedder, task.audio), task.labels)
    probe_dir = out / "probe"
    probe_dir.mkdir(exist_ok=True)
    plot_accuracy(results, probe_dir / "probe.png", f"linear probe: {task.name}")
    atomic_write_text(probe_dir / "probe.json", json.dumps({"data": task.name, "results": results}) + "\n")
    trained, baseline = results["trained"]["best_accuracy"], results["random init"]["best_accuracy"]
    verdict = "beats" if trained > baseline else "does not beat (train longer: --train-steps)"
    console.print(
        f"probe {task.name}: after {steps} steps the trained model ({trained:.2f}) {verdict} its random "
        f"init ({baseline:.2f}); chance {results['trained']['chance']:.2f}",
        highlight=False,
    )
    report = write_report(workdir, workdir / "stats" / "report")
    console.print(f"stats: {report['hours']:.3f} h, {len(report['teachers'])} teachers", highlight=False)
    return {
        "checkpoints": str(run_dir),
        "hf_model": str(hf_dir),
        "probe": str(probe_dir / "probe.png"),
        "stats_report": report["outputs"]["report"],
    }


def _demo_kmeans(workdir: Path, exec_config: ExecutorConfig, workers: int) -> dict[str, str]:
    """HuBERT iteration 1 on the demo corpus: MFCC features, a k-means fit (k = 100 at most: the corpus
    is small), and its labels as the label set `kmeans`."""
    from mert_pipeline.teachers import KMeansTeacher
    from stages.features import FeaturesConfig, FeaturesStage
    from stages.kmeans import fit_from_features

    threads = max(1, (os.cpu_count() or 1) // workers)
    features = FeaturesConfig(workdir=workdir, sample_frames=100_000, files_per_task=4, threads=threads)
    summary = run_stage(FeaturesStage(features), exec_config).summary
    k = max(2, min(100, summary["features"]["sample"]["frames"] // 20))
    with console.status(f"kmeans fit: k={k} on the MFCC sample"):
        fit = fit_from_features(workdir, "mfcc", k, name="demo")
    console.print(f"kmeans fit: k={k}, inertia/frame {fit['inertia_per_frame']:.2f}", highlight=False)
    teacher = KMeansTeacher(centroids=fit["centroids"], threads=threads).resolve()
    config = TokenizeConfig(workdir=workdir, teacher=teacher, name="kmeans", files_per_task=4)
    labels = run_tokenize(config, exec_config).summary["outputs"]
    return {"features_dir": summary["outputs"]["features_dir"], "kmeans_labels": labels["labels_dir"]}


def _demo_codec(out: Path) -> Path | None:
    """The real EnCodec weights when the encodec package can load them; otherwise a test codec (the real
    architecture with random weights and k-means codebooks), announced loudly: its codes exercise every
    stage but are not MERT's teacher."""
    from mert_pipeline.codec import CodecError, load_codec, make_test_codec

    try:
        with console.status("loading the EnCodec 24 kHz weights"):
            load_codec(None)
        return None
    except CodecError as exc:
        path = out / "test-codec.pt"
        if not path.exists():
            with console.status("building a test codec"):
                make_test_codec(path, seed=0)
        console.print(
            "[bold yellow]WARNING: the real EnCodec weights are not available, so the demo labels with a "
            f"TEST CODEC ({path}): the real architecture with random weights. Its codes are not MERT's "
            f"teacher.[/] Reason: {exc}",
            highlight=False,
            soft_wrap=True,
        )
        return path


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
