"""Benchmark of `tokenize --teacher rvq`: the official approach and this stage, side by side, one run.

Run from the repository root:

    python benchmarks/tokenize_rvq.py                       # CPU: 6 tracks of 1-5 min
    python benchmarks/tokenize_rvq.py --device cuda         # GPU, when one is present
    python benchmarks/tokenize_rvq.py --quick               # 2 short tracks, a sanity run

What is timed, on the same 24 kHz mono FLAC files (synthesized music, 1 to 5 minutes each):

(a) the official MERT script's approach: the bare `EncodecModel.encode` on each whole file, one file at a
    time (decode the file, move it to the device, encode, codes back to the host);
(b) this stage end to end through `execute` (plan, read, chunked exact streaming with batching across
    files, `.npy` writes, manifests), with the CLI's defaults for the device.

On the CPU both get the same cores: (a) runs with torch using every core, (b) with the CLI default of one
worker per core and one thread each (and also one worker with every core, for comparison). Then bf16
autocast (and fp16 on CUDA) runs through the stage, and its codes are compared with fp32 per codebook.

Weights: the encodec package's pretrained 24 kHz weights when they can be loaded (or `--codec-checkpoint`);
otherwise a test codec with the real architecture and random weights: the same computation, so the same
speed. Its codebooks are far less separated than trained ones, so the reduced-precision agreement it
shows is a lower bound.
"""

from __future__ import annotations

import argparse  # noqa: E402
import os
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
)

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from mert_pipeline.demo.synth import render_track  # noqa: E402
from mert_pipeline.demo.test_codec import make_test_codec  # noqa: E402
from mert_pipeline.devices import resolve_device  # noqa: E402
from mert_pipeline.executor import ExecutorConfig, execute  # noqa: E402
from mert_pipeline.manifests import LabelRecord, iter_records  # noqa: E402
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots  # noqa: E402
from mert_pipeline.stages.resample import ResampleConfig, ResampleStage  # noqa: E402
from mert_pipeline.stages.tokenize import TokenizeConfig, TokenizeStage  # noqa: E402
from mert_pipeline.teachers.rvq import (  # noqa: E402
    CodecError,
    RvqTeacher,  # noqa: E402
    default_files_per_task,  # noqa: E402
    load_codec,
)


def build_corpus(root: Path, minutes: list[float]) -> Path:
    """Tracks at 24 kHz mono FLAC, run through manifest and resample (which copies them) into a WORKDIR.

    Up to 6 distinct tracks are rendered (rendering is slow); more tracks are cut from those at other
    offsets with other gains, so every file differs."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    longest = max(minutes) * 60
    bases = [render_track(500 + i, longest + 7.0, 24000, 1) for i in range(min(6, len(minutes)))]
    for i, length in enumerate(minutes):
        base = bases[i % len(bases)]
        offset = (i // len(bases)) * 24000
        audio = base[offset : offset + int(length * 60 * 24000)] * (0.6 + 0.4 * ((i * 7919) % 97) / 97)
        with sf.SoundFile(corpus / f"track{i}.flac", "w", 24000, 1, "PCM_16", format="FLAC") as handle:
            for j in range(0, len(audio), 1 << 16):
                handle.write(audio[j : j + (1 << 16)])
    workdir = root / "work"
    local = ExecutorConfig(kind="local", workers=1)
    config = ManifestConfig(roots=resolve_roots([corpus]), workdir=workdir, valid_percent=0.0, min_seconds=0)
    assert execute(ManifestStage(config), local).ok
    assert execute(ResampleStage(ResampleConfig(workdir=workdir)), local).ok
    return workdir


def official(checkpoint: str | None, paths: list[Path], device: torch.device) -> float:
    """(a): whole-file `model.encode`, one file at a time; seconds."""
    model, _ = load_codec(checkpoint, 6.0, device)
    start = time.perf_counter()
    for path in paths:
        wav, _ = sf.read(path, dtype="float32")
        with torch.no_grad():
            frames = model.encode(torch.from_numpy(wav).to(device)[None, None])
        codes = torch.cat([f[0] for f in frames], dim=-1)[0].cpu().numpy().astype(np.int16)
        assert codes.shape[0] == 8
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def stage(workdir: Path, teacher: RvqTeacher, workers: int, name: str) -> tuple[float, dict[str, np.ndarray]]:
    """(b): the stage end to end; seconds (the timed run after a warm-up) and the codes by id. Tasks are
    sized as the CLI sizes them for the device."""
    files_per_task = default_files_per_task(teacher.device)
    config = TokenizeConfig(
        workdir=workdir, teacher=teacher, name=name, files_per_task=files_per_task, replace=True
    )
    tokenize = TokenizeStage(config)
    execute(tokenize, ExecutorConfig(kind="local", workers=workers, force=True))  # warm-up: pools, models
    start = time.perf_counter()
    report = execute(tokenize, ExecutorConfig(kind="local", workers=workers, force=True))
    seconds = time.perf_counter() - start
    assert report.ok, report.failed
    labels = workdir / "labels" / name
    codes = {
        r.id: np.load(labels / r.relpath)
        for r in iter_records(labels / "labels.parquet", record_type=LabelRecord)  # type: ignore[union-attr]
    }
    return seconds, codes


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[float]:
    same = sum((a[k] == b[k]).sum(axis=1) for k in a)
    total = sum(a[k].shape[1] for k in a)
    return [float(x) / total for x in same]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--codec-checkpoint", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of (a); median")
    parser.add_argument("--tracks", type=int, default=6, help="number of tracks, 1 to 5 min each")
    parser.add_argument("--chunk-seconds", type=float, default=None, help="default: the CLI's")
    parser.add_argument("--batch-seconds", type=float, default=None, help="default: the CLI's")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cores = os.cpu_count() or 1
    cycle = [1.0, 2.0, 3.0, 5.0, 1.5, 4.0]
    minutes = [0.5, 1.0] if args.quick else [cycle[i % len(cycle)] for i in range(args.tracks)]
    checkpoint = args.codec_checkpoint
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        weights = "given checkpoint"
        if checkpoint is None:
            try:
                load_codec(None)
                weights = "encodec pretrained"
            except CodecError:
                checkpoint = str(make_test_codec(tmp / "test-codec.pt"))
                weights = "TEST CODEC (real architecture, random weights)"
        workdir = build_corpus(tmp, minutes)
        paths = sorted((workdir / "audio_24k").rglob("*.flac"))
        audio_seconds = sum(sf.info(p).frames for p in paths) / 24000
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        print(
            f"machine: {platform.processor() or platform.machine()}, {cores} cores {gpu}; python "
            f"{platform.python_version()}, torch {torch.__version__}; weights: {weights}; "
            f"{len(paths)} tracks, {audio_seconds / 60:.1f} min of audio"
        )
        torch.set_num_threads(cores)
        official(checkpoint, paths[:1], device)  # warm-up
        a = statistics.median(official(checkpoint, paths, device) for _ in range(args.repeats))
        base = RvqTeacher(
            checkpoint=checkpoint,
            device=str(device.type),
            chunk_seconds=args.chunk_seconds,
            batch_seconds=args.batch_seconds,
        ).resolve()
        print("\n| what | seconds | x real time | vs (a) | code agreement with fp32 per codebook |")
        print("|---|---:|---:|---:|---|")
        show("(a) official: whole-file model.encode, one file at a time", a, audio_seconds, a, None)
        if device.type == "cuda":
            rows_per_batch = base.batch_rows("cuda")
            label = f"(b) stage, 1 worker, {rows_per_batch} rows x {base.chunk_for('cuda'):g} s"
            configs = [(label, base, 1, "fp32")]
            reduced = [("bfloat16", "bf16"), ("float16", "fp16")]
        else:
            configs = [
                (
                    f"(b) stage, 1 worker x {cores} threads (CLI default)",
                    _with(base, threads=cores),
                    1,
                    "fp32",
                ),
                (f"(b) stage, {cores} workers x 1 thread", _with(base, threads=1), cores, "fp32_nw"),
            ]
            reduced = [("bfloat16", "bf16")]
        results: dict[str, dict[str, np.ndarray]] = {}
        for label, teacher, workers, name in configs:
            seconds, codes = stage(workdir, teacher, workers, name)
            results[name] = codes
            agree = agreement(results["fp32"], codes) if name != "fp32" else None
            show(label, seconds, audio_seconds, a, agree)
        workers0, teacher0 = configs[0][2], configs[0][1]
        # bf16 on a CPU without native bf16 units is slow (minutes per minute of audio), so on CPU the
        # reduced-precision runs use a short corpus of their own, with an fp32 run on it for agreement.
        small, small_seconds, reference = workdir, audio_seconds, results["fp32"]
        if device.type != "cuda":
            small = build_corpus(tmp / "reduced", [0.25, 0.5])
            small_seconds = sum(sf.info(p).frames for p in (small / "audio_24k").rglob("*.flac")) / 24000
            _, reference = stage(small, teacher0, workers0, "fp32")
        for dtype, name in reduced:
            seconds, codes = stage(small, _with(teacher0, dtype=dtype), workers0, name)
            where = "" if small is workdir else f", on {small_seconds / 60:.2f} min of its own"
            label = f"(b) stage, {dtype} autocast{where}"
            show(
                label, seconds, small_seconds, a * small_seconds / audio_seconds, agreement(reference, codes)
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def show(label: str, seconds: float, audio_seconds: float, a: float, agree: list[float] | None) -> None:
    """One table row, printed as soon as it is measured. `a`: (a)'s seconds for the same audio."""
    agree_text = " ".join(f"{x * 100:.2f}" for x in agree) if agree else ""
    line = f"| {label} | {seconds:.2f} | {audio_seconds / seconds:.1f}x | {a / seconds:.2f}x | {agree_text} |"
    print(line, flush=True)


def _with(teacher: RvqTeacher, **changes: object) -> RvqTeacher:
    from dataclasses import replace

    return replace(teacher, **changes)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
