"""Commands that train and use the model: `train` (torchrun, after checking its inputs), `export hf`, `embed`,
`probe`; and `stats` on the data."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mert_pipeline import pipeline
from mert_pipeline.cli.common import console, errors, fail, note, progress, with_executor
from mert_pipeline.executor import ExecutorConfig

DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto (CUDA when present), cpu or cuda.")
]
ModelOpt = Annotated[
    Path, typer.Option("--checkpoint", help="Trainer checkpoint, run folder, or `export hf` directory.")
]


def train(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            metavar="YAML",
            help="A config file, or a shipped one: tiny, small, mert_95m or mert_330m.",
        ),
    ],
    shards: Annotated[
        str,
        typer.Option(
            "--shards", metavar="SHARDS", help="The shard folder (or URL) that `run` or `shard` wrote."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="RUN_DIR", help="Run folder: checkpoints and logs.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY=VALUE...", help="Config overrides, e.g. batch_size=4 max_steps=1000."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in RUN_DIR.")
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            metavar="WEIGHTS",
            help="Start a new run from these weights: a MERT-v1 HF directory, MERT-v1-*_fairseq.pt, an "
            "`export hf` directory, or one of our checkpoints or run folders (the model's shape with them).",
        ),
    ] = None,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node", min=1, help="Processes on this machine. Default: one per GPU, or 1 on a CPU."
        ),
    ] = None,
) -> None:
    """Pretrain on a shard set: check the config and the shards, then launch torchrun on this machine.

    It runs `torchrun --standalone trainer/pretrain.py` (as the module mert_pipeline.trainer.pretrain)
    with the same arguments, after checking them here, so a wrong --shards or --config costs one line
    instead of a process group's traceback. For several machines, run torchrun yourself (docs/training.md).
    """
    import torch

    from mert_pipeline.trainer.pretrain import check_inputs, check_run_dir

    overrides = [*(overrides or []), *([f"init_from={init_from}"] if init_from else [])]
    try:
        mcfg, tcfg, index = check_inputs(config, shards, overrides)
        check_run_dir(out, resume)
    except ValueError as exc:
        raise fail(" ".join(str(exc).split())) from exc
    nproc = nproc_per_node or max(1, torch.cuda.device_count())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "mert_pipeline.trainer.pretrain", "--config", config, "--shards", shards]
    command += ["--out", str(out), *(["--resume"] if resume else []), *overrides]
    note(
        f"train: {mcfg.num_layers} layers x {mcfg.embed_dim}, teachers {', '.join(tcfg.teachers)}, "
        f"{index.samples('train')} train segments, {nproc} process(es) -> {out}"
    )
    start = time.perf_counter()
    code = subprocess.call(command)
    verdict = "[bold green]train finished[/]" if code == 0 else f"[bold red]train failed[/] (exit {code})"
    console.print(f"{verdict} in {time.perf_counter() - start:.1f} s: checkpoints and log.jsonl in {out}")
    if code:
        raise typer.Exit(code=1)


def export_hf(
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
    from mert_pipeline.hf_export import CheckpointError
    from mert_pipeline.hf_export import export_hf as export

    start = time.perf_counter()
    try:
        with errors(), console.status("exporting"):
            summary = export(checkpoint, pipeline.check_workdir(out), verify=verify)
    except CheckpointError as exc:
        raise fail(str(exc)) from exc
    note(
        f"export hf: step {summary['step']} of {summary['checkpoint']}: {summary['parameters'] / 1e6:.2f}M "
        f"parameters in {summary['kept_tensors']} tensors -> {out} "
        f"({'pre-LN' if summary['do_stable_layer_norm'] else 'post-LN'}, {summary['feat_extract_norm']} norm)"
    )
    for name, shape in summary["dropped"].items():
        note(f"  dropped (training only): {name} {tuple(shape)}")
    check = summary["max_abs_diff"]
    verdict = "not checked (--no-verify)" if check is None else f"max |diff| {check:.2e} over all layers"
    note(f"transformers round trip: {verdict}; {time.perf_counter() - start:.1f} s")


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
    from mert_pipeline.report import default_report_dir, write_report
    from mert_pipeline.storage import as_location

    location = as_location(source)
    start = time.perf_counter()
    try:
        target = pipeline.check_workdir(out if out is not None else default_report_dir(location))
        with errors(), console.status("reading labels"):
            result = write_report(location, target)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise fail(str(exc)) from exc
    rejects = sum(n for group in result["rejects"].values() for n in group.values())
    count = result.get("segments", result["files"])
    unit = "segments" if result["kind"] == "shards" else "files"
    note(
        f"stats: {result['hours']:.3f} h in {count} {unit}, "
        f"{rejects} rejects, {len(result['teachers'])} teachers, in {time.perf_counter() - start:.1f} s"
    )
    if "dedup" in result:
        found = result["dedup"]
        note(
            f"  dedup: {found['groups']} groups of one recording, {found['dropped_files']} files dropped "
            f"({found['dropped_hours']:.3f} h)"
        )
    for name, facts in result["teachers"].items():
        used = [row for row in facts["codebooks"] if row is not None]
        if used:
            note(
                f"  {name}: codebook 0 uses {used[0]['used']}/{facts['num_classes']} codes, perplexity "
                f"{used[0]['perplexity']:.1f}, entropy {used[0]['entropy_bits']:.2f} bits"
            )
    for pair, metrics in result["agreement"].items():
        note(
            f"  {pair.replace('~', ' vs ')}: MI {metrics['mutual_information']:.3f} bits, "
            f"NMI {metrics['nmi']:.3f}"
        )
    for warning in result.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    note(f"report: {result['outputs']['report']} (plots beside it)")


def probe(
    checkpoint: ModelOpt,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="builtin:pitch, builtin:timbre, a CSV (path,label[,group]) or a folder per class. With a "
            "group column (recording, instrument...) no group has clips on both sides of a fold.",
        ),
    ] = "builtin:pitch",
    out: Annotated[Path, typer.Option("--out", help="Folder for probe.json and probe.png.")] = Path("probe"),
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline/--no-baseline", help="Also probe a random init of the same model and MFCC features."
        ),
    ] = True,
    mfcc: Annotated[
        bool,
        typer.Option(
            "--mfcc/--no-mfcc", help="The MFCC baseline: MFCC-13 + deltas, mean and std over frames per clip."
        ),
    ] = True,
    folds: Annotated[
        int,
        typer.Option(
            "--folds",
            min=2,
            help="Folds of the stratified cross-validation (fewer if a class has fewer groups or clips).",
        ),
    ] = 4,
    pool: Annotated[
        str,
        typer.Option(
            "--pool",
            help="How a layer's frames become one vector per clip: mean (MARBLE's), or meanstd (mean and std "
            "side by side, as the MFCC baseline has).",
        ),
    ] = "mean",
    per_class: Annotated[int, typer.Option("--per-class", min=2, help="builtin: clips per class.")] = 16,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the folds, the builtin data, the baseline.")
    ] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """MARBLE-style linear probe: pooled embeddings of every layer (--pool), a logistic regression per layer,
    accuracy the mean over stratified folds (by group when the CSV has one); against a random init and an
    MFCC baseline; best layer, OUT/probe.png and OUT/probe.json."""
    from mert_pipeline.probe import run_probe

    try:
        with errors():
            summary = run_probe(
                checkpoint,
                data,
                out,
                baseline=baseline,
                mfcc=mfcc,
                folds=folds,
                pool=pool,
                per_class=per_class,
                seed=seed,
                device=device,
                on_status=console.status,
            )
    except ValueError as exc:
        raise fail(str(exc)) from exc
    for reject in summary["rejects"][:10]:
        console.print(f"[yellow]reject:[/] {reject['path']}: {reject['detail']}", highlight=False)
    results = summary["results"]
    first = next(iter(results.values()))
    k = summary["folds"]
    if k < summary["folds_requested"]:
        console.print(
            f"[bold yellow]warning:[/] --folds {summary['folds_requested']} reduced to {k}: a class has only "
            f"{k} {'clips' if summary['groups'] is None else 'groups'}",
            highlight=False,
            soft_wrap=True,
        )
    by = "" if summary["groups"] is None else f", by group ({summary['groups']} groups)"
    note(
        f"probe {summary['data']}: held-out accuracy, mean of {k} folds{by}; chance {first['chance']:.3f}, "
        f"majority class {first['majority']:.3f}"
    )
    width = max(len(name) for name in results)
    trained = results["trained"]["best_accuracy"]
    for name, result in results.items():
        line = (
            f"  {name:<{width}}  best layer {result['best_layer']:>2}  accuracy {result['best_accuracy']:.3f}"
        )
        if name == "trained":
            line += "  by layer: " + " ".join(f"{a:.2f}" for a in result["accuracy"])
        else:
            line += f"  trained {100 * (trained - result['best_accuracy']):+.1f} points"
        note(line)
    note(
        f"probe: {summary['clips']} clips, each held out once (one clip is about "
        f"{100 / max(1, summary['clips']):.1f} points of accuracy), {len(summary['rejects'])} rejects, "
        f"{summary['seconds']:.1f} s -> {out / 'probe.json'}, {out / 'probe.png'}"
    )


@with_executor()
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
    *,
    executor: ExecutorConfig,
) -> None:
    """Per-file embeddings (float32 .npy) of any audio (any rate: resampled to 24 kHz with soxr), batched,
    on the GPU when present, on a local process pool or Ray (each worker loads the model once). Finished
    tasks are skipped (--force redoes them); unreadable files go to OUT/rejects.jsonl with a reason.

    Writes: OUT/<id>.npy, OUT/rejects.jsonl, OUT/embed.json, OUT/stats/embed.json."""
    with errors(), progress() as shown:
        report = pipeline.embed(
            source,
            checkpoint,
            out,
            layers=layers,
            pool=pool,
            chunk_seconds=chunk_seconds,
            batch_size=batch_size,
            device=device,
            files_per_task=files_per_task,
            executor=executor,
            progress=shown,
        )
    counts, speed = report.summary["counts"], report.summary["throughput"]
    note(
        f"embed: {counts['accepted']} files, {counts['rejected']} rejected, {counts['audio_seconds']:.1f} s "
        f"of audio, {speed['x_real_time']:g}x real time per worker on {report.summary['device']} -> "
        f"{out}/<id>.npy"
    )
