"""The pipeline as a Python API: each step as a function, and the whole chain in `run_pipeline`.

    from mert_pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(roots=["/data/music"], workdir="work", teachers=("rvq", "kmeans500"))
    report = run_pipeline(config)
    print(report.shards, report.hours, report.ok)

Every CLI command is a thin caller of one of these functions (`mert_pipeline.cli`), and so are the demo,
the tests and the benchmarks. A step checks its inputs, builds its stage, and runs it with the WORKDIR
locked (`run_stage`); what it cannot do is a `PipelineError` (one line, the user's to fix), and tasks that
failed are a `StageFailed` carrying the stage's report (rerun to retry them). Each stage keeps its own
best defaults (worker count, torch threads, files per task) unless the caller sets them: the RVQ teacher
on a CPU runs one worker with a torch thread per core, the signal stages one worker per core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mert_pipeline import storage
from mert_pipeline.devices import check_device, cpu_count, model_workers, threads_per_worker
from mert_pipeline.executor import ExecutorConfig, Stage, StageReport, Task, TaskOutcome, execute, session
from mert_pipeline.fs import WorkdirBusy, atomic_write_json, ensure_writable_dir, workdir_lock
from mert_pipeline.layout import Workdir, bookkeeping_dir, check_name
from mert_pipeline.manifests.records import DEFAULT_SEED
from mert_pipeline.progress import Progress
from mert_pipeline.resample import OutputSpec
from mert_pipeline.shards import VerifyReport, parse_size
from mert_pipeline.storage import Location, as_location

TEACHER_KINDS = ("rvq", "kmeans", "bestrq")
# The k-means teachers of `run --teachers`, NAME<k>: the features each clusters. Their label sets are named
# NAME<k> too (`label_set_name`), so MFCC's and the music teacher's live side by side in one WORKDIR.
KMEANS_TEACHERS = {"kmeans": "mfcc", "music": "cqt"}


class PipelineError(ValueError):
    """A step cannot run: misuse or a missing input the user can fix, said in one line."""


class NothingAccepted(PipelineError):
    """Every input file was rejected: nothing for the later stages to do (exit code 1, not 2: the command
    was right, the files were not). A partly rejected corpus is no error."""

    exit_code = 1


def check_accepted(report: StageReport, rejects: Path, what: str) -> StageReport:
    """`report` when its stage accepted at least one file; else NothingAccepted with the reasons."""
    counts = report.summary.get("counts", {})
    if counts.get("accepted", 0) or not counts.get("files_seen", 0):
        return report
    reasons = sorted(
        ((int(n), key.removeprefix("rejected.")) for key, n in counts.items() if key.startswith("rejected.")),
        reverse=True,
    )
    shown = ", ".join(f"{n} {reason}" for n, reason in reasons[:4])
    raise NothingAccepted(
        f"all {counts['files_seen']} {what} were rejected ({shown}); each file's reason is in {rejects}"
    )


class StageFailed(RuntimeError):
    """Some of a stage's tasks failed; the others finished. Rerunning the same call retries them."""

    def __init__(self, report: StageReport, errors_dir: Path) -> None:
        self.report = report
        self.errors_dir = errors_dir
        super().__init__(
            f"{len(report.failed)} of {report.tasks} {report.stage} tasks failed; tracebacks in "
            f"{errors_dir}; rerun the same command to retry them"
        )


def _line(exc: BaseException) -> str:
    """An exception's message as one line (what a PipelineError says), any URL's query string hidden."""
    return " ".join(storage.redact(word) for word in str(exc).split())


# --------------------------------------------------------------------------------------------------
# Running one stage
# --------------------------------------------------------------------------------------------------


def scheduled(executor: ExecutorConfig | None, default_workers: int) -> ExecutorConfig:
    """`executor` with its worker count filled in: the caller's, else the stage's own default."""
    executor = executor or ExecutorConfig()
    if executor.workers is None:
        executor = dataclasses.replace(executor, workers=default_workers)
    return executor


def run_stage(
    stage: Stage,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
    unit: str = "files",
) -> StageReport:
    """Execute a stage with its root locked, reporting to `progress`. A stage's input error (a missing
    manifest, labels that do not align, a bad option) is a PipelineError; failed tasks are StageFailed."""
    progress = progress or Progress()
    executor = scheduled(executor, cpu_count())
    bar = progress.stage(stage.name, unit)

    def on_plan(tasks: list[Task]) -> None:
        bar.plan(sum(t.size for t in tasks))

    def on_task(outcome: TaskOutcome, task: Task) -> None:
        bar.advance(task.size)

    try:
        with workdir_lock(stage.workdir):
            report = execute(stage, executor, on_task=on_task, on_plan=on_plan)
    except WorkdirBusy as exc:
        raise PipelineError(str(exc)) from exc
    except (FileNotFoundError, ValueError) as exc:  # the stage's own one-line input errors
        raise PipelineError(_line(exc)) from exc
    progress.report(report, unit)
    if not report.ok:
        raise StageFailed(report, bookkeeping_dir(stage.workdir, stage.name) / "errors")
    return report


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """WORKDIR locked for a whole command (re-entrant: its stages lock it again)."""
    try:
        with workdir_lock(workdir):
            yield
    except WorkdirBusy as exc:
        raise PipelineError(str(exc)) from exc


# --------------------------------------------------------------------------------------------------
# Checking what the user named
# --------------------------------------------------------------------------------------------------


def check_workdir(path: Path | str) -> Path:
    """A folder we can write in (created if missing), made absolute."""
    path = Path(path)
    try:
        ensure_writable_dir(path)
    except OSError as exc:
        raise PipelineError(exc.strerror or str(exc)) from exc
    return path.resolve()


def check_roots(roots: list[str] | tuple[str, ...] | list[Path]) -> tuple[str, ...]:
    """Local folders or files that exist, or URLs (s3://bucket/prefix) that hold something: resolved,
    sorted, de-duplicated, none inside another."""
    from mert_pipeline.stages.manifest import resolve_roots

    if not roots:
        raise PipelineError("give at least one ROOT: a folder of audio files (or a URL)")
    located = [_build(lambda root=root: as_location(str(root))) for root in roots]
    for root in located:
        try:
            found = storage.exists(root)
        except OSError as exc:
            raise PipelineError(_line(exc)) from exc
        if not found:
            raise PipelineError(f"root {root} does not exist")
    try:
        return resolve_roots(located)
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc


def shards_location(text: str | Path) -> Location:
    """A SHARDS argument: a local folder (made absolute) or a URL, proven writable when remote."""
    location = _build(lambda: as_location(str(text)))
    if isinstance(location, Path):
        return location.resolve()
    try:
        storage.check_writable(location)
    except OSError as exc:
        raise PipelineError(_line(exc)) from exc
    return location


def existing_workdir(workdir: Path | str, needs: str = "audio") -> Path:
    """A WORKDIR that already holds what the next stage reads: the `manifest` (for `resample`) or the
    resampled `audio` (for every later stage). Checked before anything is written there."""
    layout = Workdir(Path(workdir))
    if needs == "manifest":
        needs, hint = layout.manifest, f"run `mert-pipe manifest ROOT... --out {workdir}` first"
    else:
        needs, hint = layout.audio().manifest, f"run `mert-pipe resample {workdir}` first"
    if not needs.exists():
        raise PipelineError(f"{needs} not found: {hint}")
    return check_workdir(workdir)


def _build(make: Callable[[], Any]) -> Any:
    """A config or stage built from user options: its ValueError becomes a PipelineError."""
    try:
        return make()
    except ValueError as exc:
        raise PipelineError(_line(exc)) from exc


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------


def manifest(
    roots: list[str] | tuple[str, ...],
    workdir: Path | str,
    *,
    valid_percent: float = 0.01,
    seed: int = DEFAULT_SEED,
    min_seconds: float = 3.0,
    deep: bool = False,
    extensions: tuple[str, ...] | None = None,
    files_per_task: int = 200,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Probe every audio file under `roots`: WORKDIR/manifest.parquet, rejects.jsonl, train/valid.tsv."""
    from mert_pipeline.stages.manifest import DEFAULT_EXTENSIONS, ManifestConfig, ManifestStage

    resolved = check_roots(roots)
    config = _build(
        lambda: ManifestConfig(
            roots=resolved,
            workdir=check_workdir(workdir),
            valid_percent=valid_percent,
            seed=seed,
            min_seconds=min_seconds,
            deep=deep,
            extensions=extensions or DEFAULT_EXTENSIONS,
            files_per_task=files_per_task,
        )
    )
    report = run_stage(ManifestStage(config), executor, progress)
    counts = report.summary.get("counts", {})
    if not counts.get("files_seen", 0) - counts.get("rejected.extension", 0):
        wanted = (
            "every file ('*')" if "*" in config.extensions else ", ".join(f".{e}" for e in config.extensions)
        )
        others = counts.get("rejected.extension", 0)
        raise PipelineError(
            f"no audio found under {', '.join(resolved)}: looked for {wanted}"
            + (f" and skipped {others} other files; add theirs with --extensions" if others else "")
        )
    return check_accepted(report, Workdir(config.workdir).rejects, "audio files")


def resample(
    workdir: Path | str,
    *,
    output: OutputSpec | None = None,
    on_silence: str = "keep",
    on_clipping: str = "keep",
    clip_fraction: float = 1e-3,
    files_per_task: int = 32,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Every manifest file as mono audio at the target rate: WORKDIR/audio_24k/."""
    from mert_pipeline.stages.resample import ResampleConfig, ResampleStage

    config = _build(
        lambda: ResampleConfig(
            workdir=existing_workdir(workdir, needs="manifest"),
            output=output or OutputSpec(),
            on_silence=on_silence,
            on_clipping=on_clipping,
            clip_fraction=clip_fraction,
            files_per_task=files_per_task,
        )
    )
    report = run_stage(ResampleStage(config), executor, progress)
    return check_accepted(report, Workdir(config.workdir).audio().rejects, "files of the manifest")


def dedup(
    workdir: Path | str,
    *,
    keep: tuple[str, ...] | list[str] = (),
    settings: Any = None,
    files_per_task: int = 64,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Near-duplicate recordings: fingerprint every resampled file, find the pairs that share index keys
    (partitioned by hash), verify each by alignment, keep one file of each group and drop the others from
    the audio manifest as rejects `near_duplicate` (`mert_pipeline.dedup`, `stages/dedup.py`). `keep`: ids
    or source paths never dropped. Returns the search stage's report (its summary: groups, hours dropped,
    examples; `fingerprints`: the fingerprint stage's counts; seconds: both stages')."""
    from mert_pipeline.dedup import DedupSettings
    from mert_pipeline.stages.dedup import DedupConfig, DedupStage, FingerprintStage

    check_chromaprint()
    config = _build(
        lambda: DedupConfig(
            workdir=existing_workdir(workdir),
            settings=settings or DedupSettings(),
            keep=tuple(_keep_entry(item) for item in keep),
            files_per_task=files_per_task,
        )
    )
    fingerprints = run_stage(FingerprintStage(config), executor, progress)
    report = run_stage(DedupStage(config), executor, progress, unit="postings")
    report.summary["fingerprints"] = fingerprints.summary.get("counts", {})  # one step in `run`'s table
    report.seconds += fingerprints.seconds
    return check_accepted(report, Workdir(config.workdir).audio().rejects, "resampled files")


def check_chromaprint() -> None:
    """Chromaprint's library loads, or a PipelineError saying how to install it (before any stage runs)."""
    from mert_pipeline import chromaprint

    try:
        chromaprint.library()
    except chromaprint.ChromaprintMissing as exc:
        raise PipelineError(f"{exc}; or turn the step off (`run --no-dedup`)") from exc


def _keep_entry(item: str) -> str:
    """A keep-list entry as dedup compares it: an id as it is, a path made absolute (as the manifest is)."""
    from mert_pipeline.layout import is_id

    text = str(item).strip()
    return text if is_id(text) or "://" in text else str(Path(text).resolve())


def read_keep_list(path: Path | str) -> tuple[str, ...]:
    """A keep list file: one id or path a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PipelineError(f"cannot read the keep list {path}: {exc.strerror or exc}") from exc
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def rvq_teacher(
    workdir: Path | str,
    *,
    bandwidth: float = 6.0,
    checkpoint: Path | str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    chunk_seconds: float | None = None,
    batch_seconds: float | None = None,
) -> Any:
    """The EnCodec RVQ teacher, its weights loaded once here (a missing checkpoint fails before any
    worker starts) and hashed into its identity."""
    from mert_pipeline.teachers.rvq import CodecError, RvqTeacher

    teacher = _build(
        lambda: RvqTeacher(
            bandwidth=float(bandwidth),
            checkpoint=str(Path(checkpoint).resolve()) if checkpoint is not None else None,
            device=device,
            dtype=dtype,
            chunk_seconds=chunk_seconds,
            batch_seconds=batch_seconds,
            threads=0,
            gpu_lock_dir=str(Workdir(Path(workdir).resolve()).gpu_locks),
        )
    )
    try:
        return teacher.resolve()
    except (CodecError, ValueError) as exc:
        raise PipelineError(_line(exc)) from exc


def kmeans_teacher(workdir: Path | str, *, centroids: Path | str | None = None) -> Any:
    """The k-means teacher on the given centroids (default: WORKDIR's last `kmeans fit`), checked."""
    from mert_pipeline.teachers.kmeans import KMeansInputError, KMeansTeacher, last_centroids

    try:
        path = Path(centroids) if centroids is not None else last_centroids(Path(workdir))
        return KMeansTeacher(centroids=str(path.resolve()), threads=0).resolve()
    except (KMeansInputError, ValueError) as exc:
        raise PipelineError(_line(exc)) from exc


def bestrq_teacher(
    workdir: Path | str,
    *,
    codebooks: int = 1,
    codebook_size: int = 4096,
    proj_dim: int = 16,
    seed: int = DEFAULT_SEED,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> Any:
    """The BEST-RQ teacher: runs (or resumes) its log-mel mean/std pass over the train files, then saves
    its quantizer under WORKDIR/bestrq/<hash>.npz."""
    from mert_pipeline.stages.features import FeaturesStage, log_mel_stats_config
    from mert_pipeline.teachers.bestrq import BestRQ, BestRQTeacher
    from mert_pipeline.teachers.features import RunningStats

    workdir = Path(workdir)
    executor = scheduled(executor, cpu_count())
    stage = FeaturesStage(log_mel_stats_config(workdir, threads_per_worker(executor.workers or 1)))
    run_stage(stage, executor, progress)
    stats = RunningStats.load(stage.config.features.stats)
    if stats.count == 0:
        raise PipelineError(
            f"no train files in {stage.config.audio_manifest} to compute log-mel statistics on"
        )
    quantizer = _build(
        lambda: BestRQ(
            stats, seed=seed, proj_dim=proj_dim, codebook_size=codebook_size, num_codebooks=codebooks
        )
    )
    return BestRQTeacher.save_quantizer(quantizer, Workdir(workdir).bestrq, threads=0)


def teacher_workers(teacher: Any) -> int:
    """A teacher's own best worker count: for a network, one per GPU (on a CPU one, using every core);
    one per core for signal features."""
    device = teacher.model_device()
    return model_workers(device) if device is not None else cpu_count()


def label_set_name(teacher: Any) -> str:
    """The default label set of a teacher: rvq (EnCodec), kmeans<k> (MFCC or model features), music<k>
    (log-CQT), or its kind (bestrq)."""
    if teacher.kind == "kmeans":
        prefix = next((name for name, kind in KMEANS_TEACHERS.items() if kind == teacher.features), "kmeans")
        return f"{prefix}{teacher.num_classes}"
    return {"encodec_24khz": "rvq"}.get(teacher.kind, teacher.kind)


def tokenize(
    workdir: Path | str,
    teacher: Any,
    *,
    name: str | None = None,
    files_per_task: int | None = None,
    replace: bool = False,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Label every resampled file with `teacher` (from `rvq_teacher`, `kmeans_teacher`, `bestrq_teacher`)
    into WORKDIR/labels/NAME. A NAME holding another teacher configuration's labels is refused, or
    replaced with `replace`."""
    from mert_pipeline.stages.tokenize import TokenizeConfig, TokenizeStage

    executor = executor or ExecutorConfig()
    if executor.workers is None:  # on a machine without the GPU the teacher asks for: one line, say --workers
        try:
            executor = scheduled(executor, teacher_workers(teacher))
        except ValueError as exc:
            raise PipelineError(f"{_line(exc)}; on a Ray cluster, give --workers (one per GPU)") from exc
    if getattr(teacher, "threads", 1) == 0:  # the scheduler's choice: the cores shared out over workers
        teacher = dataclasses.replace(teacher, threads=threads_per_worker(executor.workers or 1))
    config = _build(
        lambda: TokenizeConfig(
            workdir=existing_workdir(workdir),
            teacher=teacher,
            name=name or label_set_name(teacher),
            files_per_task=files_per_task or teacher.files_per_task(),
            replace=replace,
        )
    )
    return run_stage(TokenizeStage(config), executor, progress)


def features(
    workdir: Path | str,
    *,
    kind: str = "mfcc",
    checkpoint: Path | str | None = None,
    layer: int | None = None,
    sample_frames: int = 1_000_000,
    seed: int = DEFAULT_SEED,
    files_per_task: int = 16,
    store: bool = True,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Frame features of every resampled file and the sample `kmeans fit` reads: WORKDIR/features/NAME.
    `store=False` keeps the sample and statistics only (the k-means teachers recompute features)."""
    from mert_pipeline.hf_export import CheckpointError
    from mert_pipeline.stages.features import FeaturesConfig, FeaturesStage

    if kind not in ("mfcc", "cqt", "model"):
        raise PipelineError(f"--kind must be mfcc, cqt or model, not {kind!r}")
    executor = scheduled(executor, model_workers("auto") if kind == "model" else cpu_count())
    try:
        config = FeaturesConfig(
            workdir=existing_workdir(workdir),
            kind=kind,
            checkpoint=str(checkpoint) if checkpoint is not None else None,
            layer=layer,
            sample_frames=sample_frames,
            seed=seed,
            files_per_task=files_per_task,
            store=store,
            threads=threads_per_worker(executor.workers or 1),
        )
    except (CheckpointError, ValueError, OSError) as exc:
        raise PipelineError(_line(exc)) from exc
    return run_stage(FeaturesStage(config), executor, progress)


def kmeans_fit(
    workdir: Path | str,
    *,
    features: str = "mfcc",
    k: int = 500,
    sample_frames: int | None = None,
    seed: int = DEFAULT_SEED,
    backend: str = "faiss",
    name: str | None = None,
) -> dict[str, Any]:
    """Fit k centroids to `features`' frame sample (WORKDIR/kmeans/NAME); they become the default centroids
    of the k-means teacher. Returns the fit's facts (fit.json)."""
    from mert_pipeline.teachers.kmeans import KMeansInputError, fit_from_features

    if backend not in ("faiss", "sklearn"):
        raise PipelineError(f"--backend must be faiss or sklearn, not {backend!r}")
    workdir = check_workdir(workdir)
    try:
        with locked(workdir):
            return fit_from_features(workdir, features, k, sample_frames, seed, backend, name)  # type: ignore[arg-type]
    except (KMeansInputError, ValueError) as exc:
        raise PipelineError(_line(exc)) from exc


@dataclass
class IterationReport:
    """What `iterate` made: the label set, the layer (and how it was chosen), the steps' reports."""

    name: str
    record: dict[str, Any]  # WORKDIR/kmeans/NAME/iteration.json
    features: StageReport
    tokenize: StageReport
    sidecars: StageReport | None
    seconds: float


def _earlier_choice(record: Path, selection: dict[str, Any]) -> dict[str, Any] | None:
    """The layer choice an earlier `iterate` into the same NAME made with the same model and options: a
    rerun resumes instead of measuring every layer again."""
    import json

    try:
        choice = json.loads(record.read_text())["layer_choice"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(choice, dict) or choice.get("selection") != selection:
        return None
    return choice if isinstance(choice.get("layer"), int) else None


def iterate(
    workdir: Path | str,
    checkpoint: Path | str,
    *,
    layer: int | None = None,
    k: int = 500,
    name: str | None = None,
    select_data: tuple[str, ...] | list[str] | None = None,
    select_frames: int = 20_000,
    select_per_class: int = 16,
    sample_frames: int = 250_000,
    shards: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    replace: bool = False,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> IterationReport:
    """HuBERT's next iteration on the same WORKDIR, without re-encoding audio: choose the layer of
    `checkpoint` (any model source; a run folder is its newest checkpoint) by measurement unless `layer`
    is given (`mert_pipeline.iterate`), sample that layer's frames over the train split (nothing stored per
    file), fit k-means, label every file into WORKDIR/labels/NAME (default `iter{k}`) and, when a shard set
    is there (`shards`, else WORKDIR/shards), add the labels to it as sidecar shards. The checkpoint, layer,
    layer scores and k go to WORKDIR/kmeans/NAME/iteration.json."""
    from mert_pipeline.hf_export import CheckpointError
    from mert_pipeline.iterate import SELECT_DATA, choose_layer
    from mert_pipeline.model_path import NotAModel, identify_model
    from mert_pipeline.stages.features import FeaturesConfig, FeaturesStage
    from mert_pipeline.teachers.model_features import ModelFeatures

    start = time.perf_counter()
    progress = progress or Progress()
    workdir = existing_workdir(workdir)
    if k < 2:
        raise PipelineError(f"--k must be at least 2, not {k}")
    try:
        name = check_name(name or f"iter{k}")
        found = identify_model(checkpoint)
        top = ModelFeatures.from_checkpoint(checkpoint, 0, device=device)  # a run folder: its newest, pinned
    except (NotAModel, CheckpointError, ValueError) as exc:
        raise PipelineError(_line(exc)) from exc
    if layer is not None and not 0 <= layer <= top.num_layers:
        raise PipelineError(f"--layer must be in 0..{top.num_layers} for {checkpoint}, not {layer}")
    default_shards = Workdir(workdir).default_shards
    target = (
        shards if shards is not None else default_shards if (default_shards / "index.json").exists() else None
    )
    executor = scheduled(executor, model_workers(device))
    selection = {
        "checkpoint_sha256": top.checkpoint_sha256,
        "k": k,
        "data": list(select_data or SELECT_DATA),
        "frames": select_frames,
        "per_class": select_per_class,
        "seed": seed,
    }
    with locked(workdir), session(executor):
        choice = (
            _earlier_choice(Workdir(workdir).kmeans(name).iteration, selection) if layer is None else None
        )
        if choice is not None:
            layer = int(choice["layer"])
            progress.note(f"iterate: layer {layer}, as chosen before with the same model and options")
        elif layer is None:
            try:
                with progress.status("iterate: choosing a layer"):
                    chosen = choose_layer(
                        dataclasses.replace(top, layer=top.num_layers),
                        Workdir(workdir).audio().manifest,
                        k=k,
                        data=tuple(select_data or SELECT_DATA),
                        frames=select_frames,
                        per_class=select_per_class,
                        seed=seed,
                    )
            except (OSError, ValueError) as exc:
                raise PipelineError(_line(exc)) from exc
            layer = chosen.layer
            choice = chosen.describe() | {"selection": selection}
            scores = ", ".join(f"{n}: {v:.3f}" for n, v in chosen.mean.items())
            progress.note(
                f"iterate: layer {layer} chosen in {chosen.seconds:.0f} s (mean MI/H by layer {scores})"
            )
        model = dataclasses.replace(top, layer=layer)
        config = _build(
            lambda: FeaturesConfig(
                workdir=workdir,
                kind="model",
                name=name,
                store=False,
                splits=("train",),
                sample_frames=sample_frames,
                seed=seed,
                model=model,
                threads=threads_per_worker(executor.workers or 1),
            )
        )
        features_report = run_stage(FeaturesStage(config), executor, progress)
        fit = kmeans_fit(workdir, features=name, k=k, seed=seed, name=name)
        progress.note(f"iterate: k-means k={k} on {fit['sample_frames']} frames of layer {layer}")
        teacher = kmeans_teacher(workdir, centroids=fit["centroids"])
        teacher = dataclasses.replace(teacher, model=dataclasses.replace(teacher.model, device=device))
        labels = tokenize(workdir, teacher, name=name, replace=replace, executor=executor, progress=progress)
        sidecars = None
        if target is not None:
            sidecars = add_sidecars(workdir, target, name, executor=executor, progress=progress)
        record = {
            "name": name,
            "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_kind": found.kind,
            "checkpoint_file": top.checkpoint,
            "checkpoint_sha256": top.checkpoint_sha256,
            "checkpoint_step": top.step,
            "layer": layer,
            "layer_choice": choice or {"layer": layer, "how": "given (--layer)"},
            "k": k,
            "centroids": fit["centroids"],
            "centroids_sha256": fit["centroids_sha256"],
            "sample_frames": fit["sample_frames"],
            "labels": str(Workdir(workdir).labels(name).path),
            "shards": str(target) if target is not None else None,
            "seed": seed,
        }
        atomic_write_json(Workdir(workdir).kmeans(name).iteration, record)
    return IterationReport(name, record, features_report, labels, sidecars, time.perf_counter() - start)


def shard(
    workdir: Path | str,
    out: str | Path,
    *,
    teachers: tuple[str, ...] | list[str] | None = None,
    segment_seconds: float = 30.0,
    shard_size: int | str = "256MB",
    shard_samples: int | None = None,
    seed: int = DEFAULT_SEED,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """WebDataset shards of audio segments and every selected label set (all of them by default)."""
    from mert_pipeline.stages.shard import ShardConfig, ShardStage

    config = _build(
        lambda: ShardConfig(
            workdir=existing_workdir(workdir),
            out=shards_location(out),
            teachers=tuple(teachers) if teachers else None,
            segment_seconds=segment_seconds,
            shard_bytes=parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size),
            shard_samples=shard_samples,
            seed=seed,
            take_over=bool(executor and executor.force),
        )
    )
    return _run_shard_stage(ShardStage(config), executor, progress, "files")


def add_sidecars(
    workdir: Path | str,
    out: str | Path,
    teacher: str,
    *,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Label-only sidecar shards of a label set made after the shards, same keys as each audio shard."""
    from mert_pipeline.stages.shard import SidecarConfig, SidecarStage

    config = _build(
        lambda: SidecarConfig(workdir=existing_workdir(workdir), out=shards_location(out), teacher=teacher)
    )
    return _run_shard_stage(SidecarStage(config), executor, progress, "shards")


def _run_shard_stage(
    stage: Any, executor: ExecutorConfig | None, progress: Progress | None, unit: str
) -> Any:
    """A shard stage locks WORKDIR (whose labels it reads) as well as its own bookkeeping root."""
    with locked(stage.config.workdir):
        try:
            ensure_writable_dir(stage.workdir)
        except OSError as exc:
            raise PipelineError(exc.strerror or str(exc)) from exc
        return run_stage(stage, executor, progress, unit=unit)


def verify(shards: str | Path, workers: int | None = None, progress: Progress | None = None) -> VerifyReport:
    """Re-read every shard against index.json: checksums, every audio member decoded, label shapes and
    alignment, key sets. The report lists every problem (none: `report.ok`)."""
    from mert_pipeline.shards import INDEX, ShardError, verify_all

    location = _build(lambda: as_location(str(shards)))
    try:
        if not storage.exists(storage.join(location, INDEX)):
            raise PipelineError(f"{storage.join(location, INDEX)} not found: run `mert-pipe shard` first")
    except OSError as exc:
        raise PipelineError(_line(exc)) from exc
    bar = (progress or Progress()).stage("verify", "shards")
    try:
        return verify_all(location, workers or cpu_count(), on_shard=lambda check: bar.advance(1))
    except ShardError as exc:
        raise PipelineError(f"{location}: {exc}") from exc


def export_fairseq(
    workdir: Path | str, out: Path | str, teachers: list[str], *, sharding: int = 0
) -> dict[str, Any]:
    """The tsv manifests, label files and dictionaries the official MERT fairseq task reads; `sharding`
    N >= 2 splits the train rows into train_{i}_N.* for the official task.sharding_data=N."""
    from mert_pipeline.stages.export import export_fairseq as export

    if not teachers:
        raise PipelineError("--teachers needs at least one label set")
    workdir = existing_workdir(workdir)
    out = check_workdir(out)
    try:
        with locked(workdir):
            return export(workdir, out, list(teachers), sharding=sharding)
    except (FileNotFoundError, ValueError) as exc:
        raise PipelineError(_line(exc)) from exc


def embed(
    source: str | Path,
    checkpoint: Path | str,
    out: Path | str,
    *,
    layers: str = "all",
    pool: str = "mean",
    chunk_seconds: float = 30.0,
    batch_size: int = 8,
    device: str = "auto",
    files_per_task: int | None = None,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> StageReport:
    """Per-file embeddings (OUT/<id>.npy) of any audio with a trained model; the model loads once here, so
    a bad checkpoint fails before any worker starts."""
    from mert_pipeline.devices import uses_cuda
    from mert_pipeline.hf_export import CheckpointError
    from mert_pipeline.stages.embed import EmbedConfig, EmbedStage

    located = as_location(check_roots([str(source)])[0])
    out = check_workdir(out)
    try:
        executor = scheduled(executor, model_workers(device))
        config = EmbedConfig(
            inputs=located,
            out=out,
            checkpoint=Path(checkpoint),
            layers=layers,
            pool=pool,
            chunk_seconds=chunk_seconds,
            batch_size=batch_size,
            device=device,
            files_per_task=files_per_task or (64 if uses_cuda(device) else 8),
            threads=threads_per_worker(executor.workers or 1),
        )
        stage = EmbedStage(config)  # loads the model once here
    except (CheckpointError, ValueError, OSError) as exc:
        raise PipelineError(str(exc).splitlines()[0]) from exc
    try:
        return run_stage(stage, executor, progress)
    except (OSError, KeyError) as exc:  # listing the inputs: an unreadable list or manifest
        raise PipelineError(str(exc).splitlines()[0]) from exc


# --------------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------------


def kmeans_teacher_name(item: str) -> tuple[str, int] | None:
    """`kmeans500` -> ("kmeans", 500), `music100` -> ("music", 100): a k-means teacher of `run --teachers`
    (a `KMEANS_TEACHERS` name and K >= 2); None for anything else."""
    prefix = item.rstrip("0123456789")
    k = item[len(prefix) :]
    if prefix in KMEANS_TEACHERS and k.isascii() and k.isdigit() and int(k) >= 2:
        return prefix, int(k)
    return None


def parse_teachers(teachers: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`rvq,kmeans500,music500` (or a sequence) -> ("rvq", "kmeans500", "music500"), checked."""
    items = (
        [t.strip() for t in teachers.split(",")]
        if isinstance(teachers, str)
        else [t.strip() for t in teachers]
    )
    kinds = []
    for item in items:
        kmeans = kmeans_teacher_name(item)
        if item not in ("rvq", "bestrq") and kmeans is None:
            raise PipelineError(
                "--teachers takes rvq, kmeansK (MFCC k-means, K >= 2, e.g. kmeans500), musicK (log-CQT "
                f"k-means, e.g. music500) and bestrq, not {item!r}"
            )
        kinds.append(kmeans[0] if kmeans is not None else item)
    if not items or len(set(kinds)) != len(kinds):
        raise PipelineError("--teachers must name each teacher once")
    return tuple(items)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything `run_pipeline` does, as plain values (the single steps' options, each with its default).
    `shards` is a folder or a URL (default WORKDIR/shards); `teachers` are rvq, kmeansK (MFCC k-means
    with K clusters, fitted here), musicK (the same on log-CQT) and bestrq."""

    roots: tuple[str, ...]
    workdir: Path
    teachers: tuple[str, ...] = ("rvq",)
    shards: str | None = None
    # manifest
    valid_percent: float = 0.01
    min_seconds: float = 3.0
    deep: bool = False
    # resample
    format: str = "flac"
    bits: int = 16
    # dedup (near-duplicate recordings): on by default; `keep` lists ids or paths never dropped
    dedup: bool = True
    keep: tuple[str, ...] = ()
    # the RVQ teacher
    codec_checkpoint: str | None = None
    bandwidth: float = 6.0
    device: str = "auto"
    dtype: str = "float32"
    # k-means teachers
    sample_frames: int = 1_000_000
    # shard
    segment_seconds: float = 30.0
    shard_size: str = "256MB"
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        roots = (self.roots,) if isinstance(self.roots, str | Path) else self.roots
        object.__setattr__(self, "roots", tuple(str(r) for r in roots))
        object.__setattr__(self, "workdir", Path(self.workdir))
        object.__setattr__(self, "teachers", parse_teachers(self.teachers))
        object.__setattr__(self, "keep", tuple(str(item) for item in self.keep))
        if self.shards is not None:
            object.__setattr__(self, "shards", str(self.shards))
        if self.codec_checkpoint is not None:
            object.__setattr__(self, "codec_checkpoint", str(self.codec_checkpoint))
        _build(lambda: check_device(self.device))
        _build(lambda: parse_size(str(self.shard_size)))
        _build(lambda: OutputSpec(format=self.format.upper(), bits=self.bits))


@dataclass
class PipelineReport:
    """What `run_pipeline` did: every stage's report, the shards' verification, where the outputs are."""

    workdir: Path
    shards: Location
    stages: list[StageReport] = field(default_factory=list)
    verify: VerifyReport | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verify is None or self.verify.ok

    @property
    def files_in(self) -> int:
        return int(self.stages[0].summary.get("counts", {}).get("accepted", 0)) if self.stages else 0

    @property
    def totals(self) -> dict[str, Any]:
        """The shard set's totals over both splits: shards, samples, seconds, bytes."""
        for report in reversed(self.stages):
            if "totals" in report.summary:
                return report.summary["totals"].get("all", {})
        return {}

    @property
    def hours(self) -> float:
        return float(self.totals.get("seconds", 0)) / 3600

    @property
    def rejects(self) -> dict[str, int]:
        """`stage: reason` -> how many files."""
        found: dict[str, int] = {}
        for report in self.stages:
            for key, value in report.summary.get("counts", {}).items():
                if key.startswith("rejected."):
                    reason = f"{report.stage}: {key.removeprefix('rejected.')}"
                    found[reason] = found.get(reason, 0) + int(value)
        return dict(sorted(found.items()))

    def summary(self) -> dict[str, Any]:
        """The facts of WORKDIR/stats/run.json."""
        stages = [
            {
                "stage": r.stage,
                "seconds": r.seconds,
                "tasks": {"total": r.tasks, "done": r.done, "skipped": r.skipped},
                "counts": r.summary.get("counts", {}),
            }
            for r in self.stages
        ]
        return {
            "seconds": round(self.seconds, 3),
            "stages": stages,
            "rejects": self.rejects,
            "shards": str(self.shards),
            "verify": None
            if self.verify is None
            else {"shards": len(self.verify.checks), "problems": len(self.verify.problems)},
        }


def run_pipeline(
    config: PipelineConfig,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> PipelineReport:
    """manifest -> resample -> dedup -> every teacher (k-means fits and BEST-RQ statistics included) ->
    shard -> verify, with WORKDIR locked throughout. Every stage resumes: calling it again after an
    interruption redoes only unfinished tasks and those whose input changed. Writes WORKDIR/stats/run.json."""
    start = time.perf_counter()
    progress = progress or Progress()
    executor = executor or ExecutorConfig()
    # Everything a later stage needs is checked before the first one starts, so a missing codec or an
    # unwritable output fails now, not after an hour of resampling.
    roots = check_roots(config.roots)
    workdir = check_workdir(config.workdir)
    shard_out = shards_location(config.shards) if config.shards else Workdir(workdir).default_shards
    if isinstance(shard_out, Path):
        check_workdir(shard_out)
    if config.dedup:
        check_chromaprint()
    rvq = None
    if "rvq" in config.teachers:
        with progress.status("loading the EnCodec weights"):
            rvq = rvq_teacher(
                workdir,
                bandwidth=config.bandwidth,
                checkpoint=config.codec_checkpoint,
                device=config.device,
                dtype=config.dtype,
            )
    report = PipelineReport(workdir=workdir, shards=shard_out)
    with locked(workdir), session(executor):  # one Ray (if any) for every stage
        report.stages.append(
            manifest(
                roots,
                workdir,
                valid_percent=config.valid_percent,
                seed=config.seed,
                min_seconds=config.min_seconds,
                deep=config.deep,
                executor=executor,
                progress=progress,
            )
        )
        output = OutputSpec(format=config.format.upper(), bits=config.bits)
        report.stages.append(resample(workdir, output=output, executor=executor, progress=progress))
        if config.dedup:
            report.stages.append(dedup(workdir, keep=config.keep, executor=executor, progress=progress))
        names = []
        for item in config.teachers:
            if item == "rvq":
                teacher = rvq
            elif (kmeans := kmeans_teacher_name(item)) is not None:
                kind, k = KMEANS_TEACHERS[kmeans[0]], kmeans[1]
                report.stages.append(
                    features(
                        workdir,
                        kind=kind,
                        sample_frames=config.sample_frames,
                        seed=config.seed,
                        store=kind == "mfcc",  # log-CQT: 4.3x MFCC's bytes, and recomputed when labelling
                        executor=executor,
                        progress=progress,
                    )
                )
                with progress.status(f"kmeans fit: {kind}, k={k}"):
                    fit = kmeans_fit(workdir, features=kind, k=k, seed=config.seed, name=f"{kind}_k{k}")
                progress.note(f"kmeans fit: {kind}, k={k}, inertia/frame {fit['inertia_per_frame']:.2f}")
                teacher = kmeans_teacher(workdir, centroids=fit["centroids"])
            else:
                teacher = bestrq_teacher(workdir, seed=config.seed, executor=executor, progress=progress)
            names.append(item)
            report.stages.append(tokenize(workdir, teacher, name=item, executor=executor, progress=progress))
        report.stages.append(
            shard(
                workdir,
                shard_out,
                teachers=names,
                segment_seconds=config.segment_seconds,
                shard_size=config.shard_size,
                seed=config.seed,
                executor=executor,
                progress=progress,
            )
        )
        report.verify = verify(shard_out, executor.workers, progress)
        report.seconds = time.perf_counter() - start
        atomic_write_json(Workdir(workdir).run_stats, report.summary())
    return report
