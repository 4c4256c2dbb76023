"""The demo: the whole toolkit on a small corpus it synthesizes itself, with no data, cluster or download.

`run_demo(OUT)` writes OUT/corpus (music-like tracks in several formats, rates and channel counts, plus a
few broken files, edge cases and two near-duplicate copies of a track so that rejects show up), runs the
pipeline on it into OUT/work and OUT/shards, trains the tiny model on the shards (OUT/run), exports it for
transformers (OUT/hf), probes it against a random init (OUT/probe) and writes the statistics report
(OUT/work/stats/report). Every part resumes, so calling it again skips finished work.

Without internet the EnCodec weights cannot be downloaded; the demo then labels with the test codec
(`demo.test_codec`: the real architecture with random weights), and says so loudly: its codes exercise
every stage but are not MERT's teacher.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.fs import atomic_write_text
from mert_pipeline.layout import Workdir
from mert_pipeline.pipeline import PipelineConfig, PipelineError, PipelineReport, check_workdir, run_pipeline
from mert_pipeline.progress import Progress

# builtin:pitch has 12 classes: 16 clips each gives 192 clips, each held out once over the probe's 4 folds, so
# one clip more or less moves the mean accuracy by half a point
PROBE_PER_CLASS = 16


@dataclass
class DemoReport:
    """What the demo made: the pipeline's report, and where each output is."""

    pipeline: PipelineReport
    outputs: dict[str, str] = field(default_factory=dict)
    test_codec: Path | None = None  # the stand-in codec, when the real EnCodec weights were unavailable
    seconds: float = 0.0


def demo_codec(out: Path, progress: Progress) -> Path | None:
    """The real EnCodec weights when the encodec package can load them (None: its own loader); otherwise
    the test codec, built once into OUT/test-codec.pt, announced as not MERT's teacher."""
    from mert_pipeline.demo.test_codec import make_test_codec
    from mert_pipeline.teachers.rvq import CodecError, load_codec

    try:
        with progress.status("loading the EnCodec 24 kHz weights"):
            load_codec(None)
        return None
    except CodecError as exc:
        path = out / "test-codec.pt"
        if not path.exists() or load_codec(path)[1].weights != "test":  # rebuilt if made before the mark
            with progress.status("building a test codec"):
                make_test_codec(path, seed=0)
        progress.note(
            "the real EnCodec weights are not available, so the demo labels with a TEST CODEC "
            f"({path}): the real architecture with random weights. Its codes are not MERT's teacher. "
            f"Reason: {exc}",
            style="warning",
        )
        return path


def run_demo(
    out: Path | str = "demo_work",
    *,
    tracks: int = 24,
    seed: int = 0,
    train_steps: int = 200,
    executor: ExecutorConfig | None = None,
    progress: Progress | None = None,
) -> DemoReport:
    """Synthesize the corpus, run the pipeline, then train, export, probe and report (module docstring)."""
    from mert_pipeline.demo.synth import synthesize_demo_corpus

    if tracks < 2:
        raise PipelineError(f"--tracks must be at least 2, not {tracks}")
    progress = progress or Progress()
    start = time.perf_counter()
    out = check_workdir(out)
    corpus = out / "corpus"
    done_flag = out / ".corpus-complete"  # outside the corpus, which is scanned
    if not done_flag.exists():
        with progress.status("synthesizing the demo corpus"):
            synthesize_demo_corpus(
                corpus,
                n_tracks=tracks,
                seed=seed,
                with_bad_files=True,
                with_edge_cases=True,
                with_near_duplicates=True,
            )
        atomic_write_text(done_flag, f"tracks={tracks} seed={seed}\n")
    progress.note(f"corpus: {corpus}")
    checkpoint = demo_codec(out, progress)
    config = PipelineConfig(
        roots=(str(corpus),),
        workdir=out / "work",
        teachers=("rvq", "kmeans100"),
        shards=str(out / "shards"),
        valid_percent=0.1,
        codec_checkpoint=str(checkpoint) if checkpoint else None,
        sample_frames=100_000,
        segment_seconds=10.0,
        shard_size="4MB",
    )
    pipeline = run_pipeline(config, executor, progress)
    report = DemoReport(pipeline=pipeline, test_codec=checkpoint)
    if not pipeline.ok:
        raise PipelineError(f"verify found {len(pipeline.verify.problems)} problems in {pipeline.shards}")  # type: ignore[union-attr]
    work = Workdir(pipeline.workdir)
    report.outputs = {
        "manifest": str(work.manifest),
        "audio_dir": str(work.audio().path),
        "labels_dir": str(work.labels_root),
        "shards": str(pipeline.shards),
    }
    if train_steps:
        report.outputs.update(
            train_export_probe(out, pipeline.workdir, Path(pipeline.shards), train_steps, progress)
        )
    report.seconds = time.perf_counter() - start
    return report


def train_export_probe(
    out: Path, workdir: Path, shards: Path, steps: int, progress: Progress
) -> dict[str, str]:
    """Train the tiny model for `steps` in this process (one rank, CPU or one GPU; its log in
    OUT/run/train.log), export it, probe it against a random init on builtin:pitch, write the stats."""
    import torch

    from mert_pipeline.hf_export import export_hf
    from mert_pipeline.probe import run_probe
    from mert_pipeline.report import write_report
    from mert_pipeline.trainer import pretrain

    if not torch.cuda.is_available():  # a tiny model gains nothing from threads, and loses much on a busy CPU
        torch.set_num_threads(1)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = Path(pretrain.__file__).parent / "configs" / "tiny.yaml"
    args = ["--config", str(config), "--shards", str(shards), "--out", str(run_dir), "--resume"]
    args += [f"max_steps={steps}", f"warmup_steps={max(1, steps // 4)}", "eval_interval=0", "keep_last=1"]
    args += [f"ckpt_interval={steps}", f"log_interval={max(1, steps // 20)}"]
    trained_before = (run_dir / f"ckpt-{steps:08d}.pt").exists()
    start = time.perf_counter()
    with (
        progress.status(f"training the tiny model for {steps} steps"),
        (run_dir / "train.log").open("a") as log,
    ):
        with contextlib.redirect_stdout(log):
            code = pretrain.main(args)
    if code:
        raise PipelineError(f"training failed (exit {code}); see {run_dir / 'train.log'}")
    logged = [
        (record["step"], record["loss"])
        for line in (run_dir / "log.jsonl").read_text().splitlines()
        if (record := json.loads(line)).get("kind") == "train" and "loss" in record
    ]
    curve = "no loss logged"
    if logged:
        (first_step, first), (last_step, last) = logged[0], logged[-1]
        curve = f"loss {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}"
    if trained_before:
        progress.note(f"train: already trained ({steps} steps, {curve}); checkpoints in {run_dir}")
    else:
        progress.note(
            f"train: {steps} steps of the tiny model in {time.perf_counter() - start:.1f} s, {curve}; "
            f"checkpoints in {run_dir}"
        )
    hf_dir = out / "hf"
    exported = export_hf(run_dir, hf_dir)
    progress.note(
        f"export hf: {exported['parameters'] / 1e6:.2f}M parameters, dropped "
        f"{', '.join(exported['dropped'])}; transformers round trip max |diff| {exported['max_abs_diff']:.1e}"
    )
    probe_dir = out / "probe"
    with progress.status(f"probing every layer on builtin:pitch ({PROBE_PER_CLASS} clips per class)"):
        probed = run_probe(hf_dir, "builtin:pitch", probe_dir, per_class=PROBE_PER_CLASS)
    results = probed["results"]
    trained, baseline = results["trained"]["best_accuracy"], results["random init"]["best_accuracy"]
    verdict = "beats" if trained > baseline else "does not beat (train longer: --train-steps)"
    mfcc = results.get("MFCC", {}).get("best_accuracy")
    progress.note(
        f"probe {probed['data']}: {probed['clips']} clips, {probed['folds']}-fold accuracy: the trained "
        f"model's best layer ({trained:.2f}) {verdict} its random init ({baseline:.2f})"
        + (f"; MFCC mean+std {mfcc:.2f}" if mfcc is not None else "")
        + f"; chance {results['trained']['chance']:.2f}"
    )
    report = write_report(workdir, Workdir(workdir).report_dir)
    progress.note(f"stats: {report['hours']:.3f} h, {len(report['teachers'])} teachers")
    return {
        "checkpoints": str(run_dir),
        "hf_model": str(hf_dir),
        "probe": str(probe_dir / "probe.png"),
        "stats_report": report["outputs"]["report"],
    }
