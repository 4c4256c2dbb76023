"""Teacher commands: `tokenize` (label the audio), `features` (frame features for k-means), `kmeans fit`,
`kmeans report`, and `iterate` (HuBERT's next iteration on a trained model's layer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mert_pipeline import pipeline
from mert_pipeline.cli.common import console, errors, fail, note, progress, with_executor
from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.manifests.records import DEFAULT_SEED


@with_executor()
def tokenize(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ (from `resample`).")],
    teacher: Annotated[
        str, typer.Option("--teacher", help="Which teacher labels the audio: rvq, kmeans or bestrq.")
    ] = "rvq",
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Label set name, WORKDIR/labels/NAME (default: rvq, kmeans<k>, music<k> for log-CQT "
            "centroids, or bestrq).",
        ),
    ] = None,
    centroids: Annotated[
        Path | None,
        typer.Option("--centroids", help="kmeans: (k, dim) centroids .npy (default: the last `kmeans fit`)."),
    ] = None,
    codebooks: Annotated[int, typer.Option("--codebooks", min=1, help="bestrq: random codebooks.")] = 1,
    codebook_size: Annotated[
        int, typer.Option("--codebook-size", min=2, max=32768, help="bestrq: entries per codebook.")
    ] = 4096,
    proj_dim: Annotated[int, typer.Option("--proj-dim", min=1, help="bestrq: projection dimension.")] = 16,
    seed: Annotated[
        int, typer.Option("--seed", help="bestrq: seed of the projection and codebooks.")
    ] = DEFAULT_SEED,
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
    device: Annotated[
        str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto (CUDA when present), cpu or cuda.")
    ] = "auto",
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
        typer.Option(
            "--files-per-task", min=1, help="Files per task (default: 4 on CPU, 256 on GPU; 16 others)."
        ),
    ] = None,
    *,
    executor: ExecutorConfig,
) -> None:
    """Label every resampled file with a teacher: EnCodec 24 kHz RVQ codes (`--teacher rvq`), k-means on
    the features its centroids were fitted on, MFCC or log-CQT (`--teacher kmeans`), or BEST-RQ
    random-projection codes of log-mel (`--teacher bestrq`).

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio. Writes: WORKDIR/labels/NAME/ab/<id>.npy (int16,
    shape (n_q, ceil(num_samples / 320)), 75 Hz), WORKDIR/labels/NAME/labels.parquet (id, teacher, config
    hash, n_q, frames, rate), rejects.jsonl and teacher.json, WORKDIR/stats/tokenize_NAME.json.
    """
    if teacher not in pipeline.TEACHER_KINDS:
        raise fail(f"--teacher must be one of {', '.join(pipeline.TEACHER_KINDS)}, not {teacher!r}")
    with errors(), progress() as shown:
        workdir = pipeline.existing_workdir(workdir)
        with pipeline.locked(workdir):
            if teacher == "rvq":
                chosen = pipeline.rvq_teacher(
                    workdir,
                    bandwidth=bandwidth,
                    checkpoint=codec_checkpoint,
                    device=device,
                    dtype=dtype,
                    chunk_seconds=chunk_seconds,
                    batch_seconds=batch_seconds,
                )
            elif teacher == "kmeans":
                chosen = pipeline.kmeans_teacher(workdir, centroids=centroids)
            else:
                chosen = pipeline.bestrq_teacher(
                    workdir,
                    codebooks=codebooks,
                    codebook_size=codebook_size,
                    proj_dim=proj_dim,
                    seed=seed,
                    executor=executor,
                    progress=shown,
                )
            report = pipeline.tokenize(
                workdir,
                chosen,
                name=name,
                files_per_task=files_per_task,
                replace=executor.force,
                executor=executor,
                progress=shown,
            )
    facts = report.summary.get("teacher", {})
    note(
        f"teacher {facts.get('kind')} config {facts.get('config_hash')}: {facts.get('n_q')} codebooks x "
        f"{facts.get('num_classes')} at {facts.get('label_rate'):g} Hz"
    )


@with_executor()
def features(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ (from `resample`).")],
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="mfcc: 39-dim MFCC+deltas at 75 Hz (HuBERT iteration 1); cqt: 168-dim log-CQT, 24 bins an "
            "octave from C2 (the music k-means teacher); model: layer --layer of the MERT model --checkpoint "
            "(HuBERT iteration 2), stored as features/model_lL.",
        ),
    ] = "mfcc",
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="--kind model: a MERT-v1 HF directory, MERT-v1-*_fairseq.pt, an `export hf` directory, or "
            "one of our checkpoints or run folders (its newest).",
        ),
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
    seed: Annotated[int, typer.Option("--seed", help="Seed of the frame sample.")] = DEFAULT_SEED,
    files_per_task: Annotated[int, typer.Option("--files-per-task", min=1, help="Files per task.")] = 16,
    *,
    executor: ExecutorConfig,
) -> None:
    """Frame features of every resampled file, plus the frame sample and statistics `kmeans fit` uses.

    Reads: WORKDIR/audio_24k/manifest.parquet and its audio. Writes: WORKDIR/features/NAME/ab/<id>.npy
    (float32, shape (ceil(num_samples / 320), dim)), features.parquet, rejects.jsonl, stats.npz (mean/std),
    sample.npy (at most --sample-frames frames), features.json, WORKDIR/stats/features_NAME.json; NAME is
    mfcc, cqt or model_lL.
    """
    with errors(), progress() as shown:
        report = pipeline.features(
            workdir,
            kind=kind,
            checkpoint=checkpoint,
            layer=layer,
            sample_frames=sample_frames,
            seed=seed,
            files_per_task=files_per_task,
            executor=executor,
            progress=shown,
        )
    sample = report.summary.get("features", {}).get("sample", {})
    note(f"sample for `kmeans fit`: {sample.get('frames', 0)} of {sample.get('from_frames', 0)} frames")


def kmeans_fit(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding features/FEATURES/ (from `features`).")],
    features: Annotated[
        str,
        typer.Option(
            "--features", help="Which feature set of `features`: mfcc, cqt, or model_lL (e.g. model_l6)."
        ),
    ] = "mfcc",
    k: Annotated[
        int, typer.Option("--k", min=1, max=32768, help="Clusters (int16 labels: at most 32768).")
    ] = 500,
    sample_frames: Annotated[
        int | None,
        typer.Option("--sample-frames", min=1, help="Fit on this many frames of the sample (default: all)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsample and of the fit.")] = DEFAULT_SEED,
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
    start = time.perf_counter()
    with errors(), console.status(f"fitting k={k} on {features} frames ({backend})"):
        fit = pipeline.kmeans_fit(
            workdir,
            features=features,
            k=k,
            sample_frames=sample_frames,
            seed=seed,
            backend=backend,
            name=name,
        )
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


def kmeans_report(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding labels/ (from `tokenize`).")],
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="Label set to report on (default: every k-means label set)."),
    ] = None,
    probe_data: Annotated[
        list[str] | None,
        typer.Option(
            "--probe-data",
            metavar="[TASK=]DATA",
            help="Labelled clips each k-means label set is measured against (repeatable): a CSV of "
            "path,label (the task is its file stem, or TASK=CSV), a folder of class folders, builtin:pitch.",
        ),
    ] = None,
) -> None:
    """Cluster usage (clusters used, perplexity) of a label set and its agreement (mutual information,
    purity) with every other label set on the files both labelled, as fairseq's measure_teacher_quality;
    with --probe-data, what each k-means label set holds about the classes of labelled clips (MI / H(class),
    purity), its own teacher labelling their frames.

    Reads: WORKDIR/labels/*/ (and WORKDIR/kmeans/*/ with --probe-data). Writes:
    WORKDIR/labels/NAME/report.json.
    """
    from mert_pipeline.labels import label_report
    from mert_pipeline.layout import Workdir

    workdir = workdir.resolve()
    start = time.perf_counter()
    try:
        with console.status("reading labels" + (" and labelling the probe clips" if probe_data else "")):
            reports = label_report(workdir, teacher, probe_data or ())
    except ValueError as exc:
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
        if report.get("probe"):
            probe = Table(title=f"{name} against labelled clips (MI in bits)", title_justify="left")
            for column in ("task", "clips", "classes", "frames", "MI", "MI/H(class)", "pur(class|t)", "NMI"):
                probe.add_column(column, justify="right")
            for task, m in report["probe"].items():
                probe.add_row(
                    task, str(m["clips"]), str(m["classes"]), str(m["frames"]),
                    f"{m['mutual_information']:.3f}", f"{m['mi_over_h_class']:.3f}",
                    f"{m['purity_class_given_label']:.3f}", f"{m['nmi']:.3f}",
                )  # fmt: skip
            console.print(probe)
        note(f"report: {Workdir(workdir).labels(name).report}")
    seconds = time.perf_counter() - start
    note(
        f"{len(reports)} label sets, {frames} frames counted in {seconds:.2f} s "
        f"({frames / max(seconds, 1e-9):,.0f} frames/s)"
    )


@with_executor()
def iterate(
    workdir: Annotated[Path, typer.Argument(help="WORKDIR holding audio_24k/ (from `resample` or `run`).")],
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--from",
            metavar="MODEL",
            help="The trained model: a run folder (its newest checkpoint), a checkpoint, an `export hf` or "
            "MERT-v1 directory, or MERT-v1-*_fairseq.pt.",
        ),
    ],
    layer: Annotated[
        int | None,
        typer.Option("--layer", min=0, help="Cluster this layer (default: choose it by label quality)."),
    ] = None,
    k: Annotated[int, typer.Option("--k", min=2, max=32768, help="Clusters of the new label set.")] = 500,
    name: Annotated[
        str | None, typer.Option("--name", help="Label set name, WORKDIR/labels/NAME (default: iter<k>).")
    ] = None,
    select_data: Annotated[
        list[str] | None,
        typer.Option(
            "--select-data",
            help="Labelled clips the layer is chosen on (repeatable): builtin:pitch, builtin:timbre, a CSV "
            "of path,label or a folder of class folders. Default: builtin:pitch and builtin:timbre.",
        ),
    ] = None,
    select_frames: Annotated[
        int, typer.Option("--select-frames", min=100, help="Train frames each layer is clustered on.")
    ] = 20_000,
    select_per_class: Annotated[
        int, typer.Option("--select-per-class", min=1, help="Clips per class of a built-in --select-data.")
    ] = 16,
    sample_frames: Annotated[
        int, typer.Option("--sample-frames", min=1, help="Frames of the chosen layer k-means is fitted on.")
    ] = 250_000,
    shards: Annotated[
        str | None,
        typer.Option(
            "--shards",
            help="Shard set (folder or URL) to add the labels to as sidecars (default: WORKDIR/shards).",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto (CUDA when present), cpu or cuda.")
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the samples and the fits.")] = DEFAULT_SEED,
    *,
    executor: ExecutorConfig,
) -> None:
    """HuBERT's next iteration in one command: k-means labels on a trained model's own layer, on the same
    WORKDIR, and sidecar shards beside the existing audio shards (no audio re-encoded).

    It chooses the layer by the label quality of its clusters on held-out labelled clips (unless --layer),
    samples that layer's frames over the train split (nothing stored per file), fits k-means, labels every
    file and adds the label set to the shards. Train on it with `teachers=[...,NAME]`.

    Reads: WORKDIR/audio_24k/ and the model. Writes: WORKDIR/labels/NAME/, WORKDIR/features/NAME/ (the
    sample), WORKDIR/kmeans/NAME/ (centroids.npy, fit.json, iteration.json: checkpoint, layer, scores, k),
    and label-only sidecar tars in SHARDS.
    """
    with errors(), progress() as shown:
        report = pipeline.iterate(
            workdir,
            checkpoint,
            layer=layer,
            k=k,
            name=name,
            select_data=select_data,
            select_frames=select_frames,
            select_per_class=select_per_class,
            sample_frames=sample_frames,
            shards=shards,
            seed=seed,
            device=device,
            replace=executor.force,
            executor=executor,
            progress=shown,
        )
    record = report.record
    choice = record["layer_choice"]
    if "per_layer" in choice:
        table = Table(title=f"layer choice: MI/H(class) of k={choice['k']} clusters", title_justify="left")
        table.add_column("layer", justify="right")
        for column in ("mean", *choice["data"]):
            table.add_column(column, justify="right")
        for number, scores in choice["per_layer"].items():
            mark = " *" if int(number) == record["layer"] else ""
            table.add_row(f"{number}{mark}", *(f"{scores[c]:.3f}" for c in ("mean", *choice["data"])))
        console.print(table)
    counts = report.tokenize.summary.get("counts", {})
    sidecars = (
        f", sidecars in {record['shards']}" if report.sidecars is not None else ", no shard set to add to"
    )
    note(
        f"iterate: {record['name']} = k-means k={record['k']} on layer {record['layer']} of "
        f"{record['checkpoint_file']} (step {record['checkpoint_step']}): {counts.get('accepted', 0)} files "
        f"labelled{sidecars}; {report.seconds:.1f} s"
    )
