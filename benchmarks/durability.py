"""Benchmark of durability: what fsyncing every output (file, then its directory, before the rename that
publishes it and before the marker or index.json that vouches for it) costs `resample` and `shard`.

Run from the repository root (after `pip install -e .`):

    .venv/bin/python benchmarks/durability.py            # the figures in benchmarks/RESULTS.md
    .venv/bin/python benchmarks/durability.py --quick    # a sanity run

A synthesized corpus (the demo's music-like tracks, 44.1/48 kHz stereo FLAC) goes through `manifest`
once; then `resample` and `shard` run with `--force` (every task redone), alternating fsync on and off
(`MERT_PIPELINE_FSYNC=0`, read when a process imports `mert_pipeline.fs`, so each timed run is its own
process), and the medians are compared. The issue's rule: an opt-out is needed when fsync costs more than
5%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = """
import sys, time
from mert_pipeline import pipeline
from mert_pipeline.executor import ExecutorConfig
work, step = sys.argv[1], sys.argv[2]
executor = ExecutorConfig(kind="local", workers=2, force=True)
start = time.perf_counter()
if step == "resample":
    pipeline.resample(work, executor=executor)
else:
    pipeline.shard(work, work + "/shards", executor=executor, shard_size="8MB")
print(time.perf_counter() - start)
"""


def timed(work: Path, step: str, fsync: bool) -> float:
    env = {**os.environ, "MERT_PIPELINE_FSYNC": "1" if fsync else "0"}
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(work), step], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tracks and repeats")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    tracks, repeats = (8, 2) if args.quick else (40, 5)

    from mert_pipeline import pipeline
    from mert_pipeline.demo.synth import synthesize_demo_corpus
    from mert_pipeline.demo.test_codec import make_test_codec

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="durability-"))
    corpus, work = root / "corpus", root / "work"
    synthesize_demo_corpus(corpus, n_tracks=tracks, seed=3, with_bad_files=False)
    pipeline.manifest([str(corpus)], work)
    pipeline.resample(work)
    rvq = pipeline.rvq_teacher(work, checkpoint=make_test_codec(root / "codec.pt"), bandwidth=1.5)
    pipeline.tokenize(work, rvq)  # labels to shard (not timed)
    hours = (
        json.loads((work / "stats/resample.json").read_text())["summary"]["counts"]["audio_seconds"] / 3600
    )
    results = {}
    for step in ("resample", "shard"):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for fsync in (True, False):  # alternating: the VM's speed drifts
                times[fsync].append(timed(work, step, fsync))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        results[step] = {"fsync_s": on, "no_fsync_s": off, "cost": on / off - 1, "runs": times}
        print(
            f"{step}: fsync {on:.2f} s, no fsync {off:.2f} s, cost {100 * (on / off - 1):+.1f}%", flush=True
        )
    print(json.dumps({"tracks": tracks, "hours": hours, "repeats": repeats, **results}, default=str))
    print(f"({time.strftime('%Y-%m-%d')}; corpus {root})")


if __name__ == "__main__":
    main()
