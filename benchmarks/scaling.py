"""Benchmark of scale-out: the same stages with 1 and 2 workers on the local pool and on Ray, and Ray's
overhead per task.

Run from the repository root:

    python benchmarks/scaling.py            # resample 48 tracks x 60 s, tokenize 8 x 30 s
    python benchmarks/scaling.py --quick    # a sanity run on a few short tracks

What is timed (warm cache, the stage end to end through `execute`, `force` so every task runs):

- resample (44.1 kHz stereo FLAC -> 24 kHz mono FLAC), 4 files per task;
- tokenize --teacher rvq (EnCodec 24 kHz architecture; the test codec when the real weights cannot be
  loaded: the same computation), 1 file per task, 1 torch thread per worker, so 2 workers use 2 cores;
  on Ray it runs on the actor pool (one model per actor);
- Ray overhead: a stage of 200 tasks that do nothing, on Ray vs in-process; the difference per task is
  what scheduling a task through Ray costs.

A local Ray is started once (its start-up time is reported apart) and shared by the Ray runs, as it
would be on a cluster. The local pool's times include starting its spawned worker processes (each
imports torch), a cost every stage run pays. Scaling efficiency = t(1 worker) / (2 x t(2 workers)).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
)

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from mert_pipeline.demo.synth import render_track  # noqa: E402
from mert_pipeline.demo.test_codec import make_test_codec  # noqa: E402
from mert_pipeline.executor import ExecutorConfig, Resources, Task, execute  # noqa: E402
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots  # noqa: E402
from mert_pipeline.stages.resample import ResampleConfig, ResampleStage  # noqa: E402
from mert_pipeline.stages.tokenize import TokenizeConfig, TokenizeStage  # noqa: E402
from mert_pipeline.teachers.rvq import (  # noqa: E402
    CodecError,
    RvqTeacher,  # noqa: E402
    load_codec,
)


@dataclass
class NoopStage:
    """Tasks that do nothing: what remains of their time is the executor's."""

    workdir: Path
    n_tasks: int = 200
    name: str = "noop"
    resources: Resources = field(default_factory=Resources)

    def plan(self) -> list[Task]:
        return [Task(rank=r, fingerprint=f"noop-{r}") for r in range(self.n_tasks)]

    def run(self, task: Task, stats: Counter) -> None:
        stats["tasks"] += 1

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        return {}


def timed(stage: Any, config: ExecutorConfig) -> float:
    start = time.perf_counter()
    report = execute(stage, config)
    assert report.ok, report.failed
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    big, small = ((8, 20.0), (4, 10.0)) if args.quick else ((48, 60.0), (8, 30.0))
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    try:
        one = ExecutorConfig(kind="local", workers=1)
        bases = [render_track(900 + i, big[1] + 2, 44100, 2) for i in range(6)]
        workdirs = []
        for name, (tracks, seconds) in (("big", big), ("small", small)):
            corpus = tmp / name / "corpus"
            corpus.mkdir(parents=True)
            for i in range(tracks):  # distinct files cut from 6 rendered tracks at other offsets and gains
                start = (i // 6) * 22050
                audio = bases[i % 6][start : start + int(seconds * 44100)] * (
                    0.5 + 0.5 * ((i * 37) % 11) / 11
                )
                sf.write(corpus / f"t{i:02d}.flac", audio, 44100, subtype="PCM_16")
            work = tmp / name / "work"
            config = ManifestConfig(
                roots=resolve_roots([corpus]), workdir=work, valid_percent=0.0, min_seconds=0
            )
            assert execute(ManifestStage(config), one).ok
            workdirs.append(work)
        try:
            load_codec(None)
            checkpoint, weights = None, "encodec pretrained"
        except CodecError:
            checkpoint, weights = str(make_test_codec(tmp / "codec.pt")), "test codec (real architecture)"
        teacher = RvqTeacher(checkpoint=checkpoint, device="cpu", threads=1).resolve()
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
            f"torch {torch.__version__}; resample: {big[0]} x {big[1]:g} s, tokenize: {small[0]} x "
            f"{small[1]:g} s; weights: {weights}; load average before: {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        import ray

        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"Ray start-up: {time.perf_counter() - start:.1f} s", flush=True)
        resample = ResampleStage(ResampleConfig(workdir=workdirs[0], files_per_task=4))
        assert execute(resample, one).ok  # warm-up (page cache)
        small_resample = ResampleStage(ResampleConfig(workdir=workdirs[1], files_per_task=4))
        assert execute(small_resample, one).ok  # the input of tokenize
        config = TokenizeConfig(workdir=workdirs[1], teacher=teacher, files_per_task=1, replace=True)
        tokenize = TokenizeStage(config)
        print("\n| stage | executor | 1 worker x RT | 2 workers x RT | speed-up | efficiency |")
        print("|---|---|---:|---:|---:|---:|")
        jobs = (("resample", resample, big[0] * big[1]), ("tokenize rvq", tokenize, small[0] * small[1]))
        for label, stage, audio_seconds in jobs:
            for kind in ("local", "ray"):
                times = {}
                for workers in (1, 2):
                    cfg = ExecutorConfig(kind=kind, workers=workers, force=True)  # type: ignore[arg-type]
                    if kind == "ray" and workers == 1:
                        cfg = ExecutorConfig(kind="ray", force=True, cpus_per_task=2.0)  # one slot of 2
                    times[workers] = timed(stage, cfg)
                speedup = times[1] / times[2]
                print(
                    f"| {label} | {kind} | {audio_seconds / times[1]:.1f}x | {audio_seconds / times[2]:.1f}x "
                    f"| {speedup:.2f}x | {speedup / 2:.0%} |",
                    flush=True,
                )
        noop = NoopStage(tmp / "noop")
        local = timed(noop, ExecutorConfig(kind="local", workers=1, force=True))
        on_ray = timed(noop, ExecutorConfig(kind="ray", force=True))
        per_task = (on_ray - local) / noop.n_tasks * 1000
        print(
            f"\nRay overhead: {noop.n_tasks} empty tasks in {on_ray:.2f} s on Ray vs {local:.2f} s "
            f"in-process: {per_task:.1f} ms per task",
            flush=True,
        )
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
