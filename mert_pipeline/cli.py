"""`mert-pipe`: one sub-command per stage, each a thin wrapper over a library function.

Every stage command takes the same executor options (`--executor local|ray`, `--workers`,
`--ray-address`, `--force`), shows a progress bar on a terminal, and ends with a short summary.
Exit codes: 0 when the run finished (rejected inputs included), 1 when tasks failed (rerun to retry
them), 2 on misuse, with a one-line `error:` message.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mert_pipeline.executor import ExecutorConfig, Stage, StageReport, Task, TaskOutcome, execute
from mert_pipeline.fs import WorkdirBusy, atomic_write_text, ensure_writable_dir, workdir_lock
from mert_pipeline.resample import OutputSpec
from stages.manifest import DEFAULT_EXTENSIONS, ManifestConfig, ManifestStage, inside_roots, resolve_roots
from stages.resample import ResampleConfig, ResampleStage
from stages.tokenize import TeacherMismatch, TokenizeConfig, TokenizeStage, default_files_per_task

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


def run_stage(stage: Stage, config: ExecutorConfig, unit: str = "files") -> StageReport:
    """Execute a stage with the workdir locked, a progress bar on terminals, and a summary at the end."""
    progress = Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    bar = progress.add_task(f"{stage.name}: planning", total=None)

    def on_plan(tasks: list[Task]) -> None:
        progress.update(bar, description=stage.name, total=sum(t.size for t in tasks))

    def on_task(outcome: TaskOutcome, task: Task) -> None:
        progress.advance(bar, task.size)

    try:
        with workdir_lock(stage.workdir), progress:
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


@app.command()
def manifest(
    roots: Annotated[
        list[Path],
        typer.Argument(metavar="ROOT...", help="Folders (or files) to scan, recursively, in sorted order."),
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
    for root in roots:
        if not root.exists():
            raise fail(f"root {root} does not exist")
    try:
        config = ManifestConfig(
            roots=resolve_roots(roots),
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


TEACHERS = ("rvq",)


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
    if config.teacher.device != "cpu":
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
    teacher: Annotated[str, typer.Option("--teacher", help="Which teacher labels the audio: rvq.")] = "rvq",
    name: Annotated[
        str | None, typer.Option("--name", help="Label set name, WORKDIR/labels/NAME (default: the teacher).")
    ] = None,
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
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
    max_retries: MaxRetriesOpt = 3,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    force: ForceOpt = False,
) -> None:
    """Label every resampled file with a teacher: EnCodec 24 kHz RVQ codes (`--teacher rvq`).

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio. Writes: WORKDIR/labels/NAME/ab/<id>.npy (int16,
    shape (n_q, ceil(num_samples / 320)), 75 Hz), WORKDIR/labels/NAME/labels.parquet (id, teacher, config
    hash, n_q, frames, rate), rejects.jsonl and teacher.json, WORKDIR/stats/tokenize_NAME.json.
    """
    if teacher not in TEACHERS:
        raise fail(f"--teacher must be one of {', '.join(TEACHERS)}, not {teacher!r}")
    workdir = _existing_audio_dir(workdir, 24000)
    try:
        exec_config = executor_config(
            executor, workers, ray_address, force, max_retries, cpus_per_task, gpus_per_task
        )
    except UsageError as exc:
        raise fail(str(exc)) from exc
    lock_dir = workdir / ".work" / "gpu-locks"
    rvq = _rvq_teacher(
        bandwidth, codec_checkpoint, device, dtype, chunk_seconds, batch_seconds, workers, lock_dir
    )
    try:
        config = TokenizeConfig(
            workdir=workdir,
            teacher=rvq,
            name=name or teacher,
            files_per_task=files_per_task or default_files_per_task(rvq.device),
        )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    report = run_tokenize(config, exec_config)
    facts = report.summary.get("teacher", {})
    console.print(
        f"teacher {facts.get('kind')} config {facts.get('config_hash')}: {facts.get('n_q')} codebooks x "
        f"{facts.get('num_classes')} at {facts.get('label_rate'):g} Hz",
        highlight=False,
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the synthesized corpus and WORKDIR go.")] = Path(
        "demo_work"
    ),
    tracks: Annotated[int, typer.Option(min=2, help="How many music-like tracks to synthesize.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the synthesized corpus.")] = 0,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = DEFAULT_WORKERS,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run every stage that exists on a small corpus this command synthesizes itself (no data, no cluster).

    Writes OUT/corpus (synthesized audio, including a few broken files so rejects show up) and
    OUT/work (the WORKDIR of every stage). Rerunning skips finished work.
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
    console.print(
        f"\n[bold green]demo finished[/] in {time.perf_counter() - start:.1f} s. Outputs:", highlight=False
    )
    for name, path in outputs.items():
        console.print(f"  {name:16s} {path}", highlight=False)


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
