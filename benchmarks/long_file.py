"""Benchmark of one hour-long track through `mert-pipe run`: peak memory of the whole process tree and the
time of each stage, against the issue's goal of at most 3 GB peak RSS whatever a file's length.

Run from the repository root (after `pip install -e .`):

    .venv/bin/python benchmarks/long_file.py                 # one 60-minute track, the figures in RESULTS.md
    .venv/bin/python benchmarks/long_file.py --minutes 10    # a shorter sanity run

The track is synthesized music (the demo's renderer), 44.1 kHz stereo FLAC, written a minute at a time so
the benchmark itself never holds it whole. `mert-pipe run` runs as a child process with the teachers
`rvq` (the test codec: the real EnCodec architecture) and `kmeans100`; its tree's resident memory (workers
included) is sampled every 50 ms from /proc, as `benchmarks/e2e.py` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from e2e import measured  # benchmarks/e2e.py: the process tree's peak RSS


def write_track(path: Path, minutes: int, rate: int = 44100) -> None:
    import numpy as np
    import soundfile as sf

    from mert_pipeline.demo.synth import render_track

    with sf.SoundFile(path, "w", samplerate=rate, channels=2, format="FLAC", subtype="PCM_16") as handle:
        for minute in range(minutes):
            handle.write(np.clip(render_track(7000 + minute, 60.0, rate, 2), -1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    from mert_pipeline.demo.test_codec import make_test_codec

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="long-file-"))
    (root / "music").mkdir()
    write_track(root / "music" / "long.flac", args.minutes)
    codec = make_test_codec(root / "codec.pt")
    child = (
        "import json, time; from mert_pipeline import PipelineConfig, run_pipeline\n"
        f"config = PipelineConfig(roots=[{str(root / 'music')!r}], workdir={str(root / 'work')!r}, "
        f"teachers=('rvq', 'kmeans100'), codec_checkpoint={str(codec)!r})\n"
        "start = time.perf_counter(); report = run_pipeline(config)\n"
        "print(json.dumps({'seconds': time.perf_counter() - start, 'ok': report.ok, 'hours': report.hours,"
        " 'stages': {r.stage: round(r.seconds, 1) for r in report.stages}}))"
    )
    result, peak = measured([sys.executable, "-c", child])
    print(json.dumps({"minutes": args.minutes, "peak_rss_gib": round(peak, 3), **result}))
    print(f"peak RSS {peak:.2f} GiB (goal: at most 3 GB); {time.strftime('%Y-%m-%d')}; work in {root}")


if __name__ == "__main__":
    main()
