"""The Python API: the README's five-line example run as written, each stage's own defaults, and errors
that say what to do."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mert_pipeline import PipelineConfig, PipelineError, StageFailed, run_pipeline
from mert_pipeline.devices import cpu_count
from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.layout import Workdir
from mert_pipeline.pipeline import (
    KMEANS_TEACHERS,
    features,
    kmeans_fit,
    kmeans_teacher,
    kmeans_teacher_name,
    manifest,
    resample,
    run_stage,
    tokenize,
)
from mert_pipeline.progress import Progress
from tests.helpers import REPO, ToyStage


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- python-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no python example between <!-- python-example --> markers"
    return block.group(1)


def music(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        t = np.arange(24000 * 4) / 24000
        tone = 0.3 * np.sin(2 * np.pi * (180 + 60 * i) * t * (1 + 0.1 * np.sin(t)))
        sf.write(
            root / f"song {i}.flac", (tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32), 24000
        )
    return root


class Recorder(Progress):
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.notes: list[str] = []

    def stage(self, name: str, unit: str):  # type: ignore[no-untyped-def]
        self.stages.append(name)
        return super().stage(name, unit)

    def note(self, text: str, style: str = "") -> None:
        self.notes.append(text)


def as_a_user_runs_it(folder: Path, codec: Path, code: str, from_stdin: bool = False) -> str:
    """The example in a fresh process, as a user runs it: saved to a file and run with `python FILE`
    (no `if __name__ == "__main__":` guard), or piped into `python -`. It names `my_music/` and the EnCodec
    checkpoint file; here they are synthesized music and the test codec under those names. Its stdout."""
    import subprocess
    import sys

    music(folder / "my_music")
    os.symlink(codec, folder / "encodec_24khz-d7cc33bc.th")
    (folder / "example.py").write_text(code)
    command = [sys.executable, "-"] if from_stdin else [sys.executable, "example.py"]
    done = subprocess.run(
        command, cwd=folder, input=code if from_stdin else None, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_readme_example_runs_as_written(
    tmp_path: Path, test_codec_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved to a file and run: the local pool's spawned workers must not run the script again (they
    would find WORKDIR locked by it)."""
    code = readme_example()
    assert len(ast.parse(code).body) <= 5  # statements: import, config, run, print
    assert cpu_count() > 1, "a pool of workers is what re-ran an unguarded script"
    printed = as_a_user_runs_it(tmp_path, test_codec_file, code)
    assert "3 files" in printed and "shards" in printed
    work = Workdir(tmp_path / "work")
    run = json.loads(work.run_stats.read_text())
    assert run["verify"] == {"shards": run["verify"]["shards"], "problems": 0}
    assert [s["stage"] for s in run["stages"]] == [
        "manifest",
        "resample",
        "dedup",
        "tokenize_rvq",
        "features_mfcc",
        "tokenize_kmeans100",
        "shard",
    ]
    # each stage kept its own best workers: the RVQ teacher one worker using every core on a CPU machine
    workers = {
        s: json.loads(work.stage_stats(s).read_text())["workers"] for s in ("manifest", "tokenize_rvq")
    }
    assert workers == {"manifest": cpu_count(), "tokenize_rvq": 1}
    assert json.loads(work.stage_stats("tokenize_kmeans100").read_text())["workers"] == cpu_count()
    index = json.loads((tmp_path / "work/shards/index.json").read_text())
    assert sorted(index["teachers"]) == ["kmeans100", "rvq"]
    monkeypatch.chdir(tmp_path)  # the example's paths are relative
    again = run_pipeline(PipelineConfig(**_example_config(code)))  # resumes: nothing to redo
    assert all(report.done == 0 for report in again.stages) and again.ok


def test_the_readme_example_runs_from_standard_input(tmp_path: Path, test_codec_file: Path) -> None:
    """`python - < example.py`: a spawned worker cannot import `<stdin>` as its main module."""
    printed = as_a_user_runs_it(tmp_path, test_codec_file, readme_example(), from_stdin=True)
    assert "3 files" in printed and json.loads((tmp_path / "work/stats/run.json").read_text())["verify"]


def _example_config(code: str) -> dict:
    """The keyword arguments of the example's PipelineConfig(...) call."""
    call = re.search(r"PipelineConfig\((.*?)\)\n", code, re.S)
    assert call
    return eval(f"dict({call.group(1)})")  # noqa: S307 - the README's own literal arguments


def test_steps_report_progress_and_keep_their_defaults(tmp_path: Path) -> None:
    recorder = Recorder()
    work = tmp_path / "w"
    manifest([str(music(tmp_path / "m", 2))], work, valid_percent=0.0, progress=recorder)
    resample(work, progress=recorder)
    features(work, sample_frames=1000, progress=recorder)
    fit = kmeans_fit(work, k=8)
    report = tokenize(work, kmeans_teacher(work), progress=recorder)
    assert recorder.stages == ["manifest", "resample", "features_mfcc", "tokenize_kmeans8"]
    assert report.summary["teacher"]["num_classes"] == 8 and fit["k"] == 8
    assert json.loads(Workdir(work).stage_stats("tokenize_kmeans8").read_text())["workers"] == cpu_count()


def test_misuse_is_a_pipeline_error_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="--teachers takes rvq, kmeansK"):
        PipelineConfig(roots=["x"], workdir=tmp_path, teachers=("mfcc",))
    with pytest.raises(PipelineError, match="--teachers must name each teacher once"):
        PipelineConfig(roots=["x"], workdir=tmp_path, teachers=("kmeans50", "kmeans100"))
    with pytest.raises(PipelineError, match="--device must be auto, cpu or cuda"):
        PipelineConfig(roots=["x"], workdir=tmp_path, device="tpu")
    with pytest.raises(PipelineError, match=f"root {tmp_path / 'nope'} does not exist"):
        run_pipeline(PipelineConfig(roots=[str(tmp_path / "nope")], workdir=tmp_path / "w"))
    with pytest.raises(PipelineError, match="is inside a root"):
        manifest([str(tmp_path)], tmp_path / "w")
    with pytest.raises(PipelineError, match="manifest.parquet not found: run `mert-pipe manifest ROOT"):
        resample(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # nothing written where nothing could run
    with pytest.raises(PipelineError, match="audio_24k/manifest.parquet not found: run `mert-pipe resample"):
        features(tmp_path / "empty")
    with pytest.raises(PipelineError, match="no centroids fitted"):
        kmeans_teacher(tmp_path)


def test_teachers_take_music_k_beside_kmeans_k(tmp_path: Path) -> None:
    """`musicK` is the music k-means teacher (log-CQT, `features --kind cqt`); it and `kmeansK` (MFCC) are
    different teachers, so one run can make both; malformed names are one-line errors."""
    config = PipelineConfig(roots=["x"], workdir=tmp_path, teachers="rvq,kmeans100,music100")
    assert config.teachers == ("rvq", "kmeans100", "music100")
    assert kmeans_teacher_name("music100") == ("music", 100) and KMEANS_TEACHERS["music"] == "cqt"
    assert kmeans_teacher_name("kmeans500") == ("kmeans", 500) and KMEANS_TEACHERS["kmeans"] == "mfcc"
    for bad in ("music", "music1", "musicK", "music-5", "Music100", "music100x", "music\u0661\u0660"):
        with pytest.raises(PipelineError, match=r"--teachers takes rvq, kmeansK .* musicK"):
            PipelineConfig(roots=["x"], workdir=tmp_path, teachers=("rvq", bad))
    with pytest.raises(PipelineError, match="--teachers must name each teacher once"):
        PipelineConfig(roots=["x"], workdir=tmp_path, teachers=("music50", "music100"))


def test_run_makes_the_music_teacher_on_log_cqt(tmp_path: Path) -> None:
    """`run --teachers music8`: log-CQT features (their sample only: the teacher recomputes them), a fit
    named cqt_k8, and the label set music8 made on those features."""
    work = tmp_path / "w"
    config = PipelineConfig(roots=[str(music(tmp_path / "m", 2))], workdir=work, teachers="music8")
    report = run_pipeline(config, ExecutorConfig(workers=1))
    assert [s.stage for s in report.stages][2:] == ["dedup", "features_cqt", "tokenize_music8", "shard"]
    fit = json.loads((work / "kmeans/cqt_k8/fit.json").read_text())
    assert fit["features_extractor"]["kind"] == "cqt" and fit["dim"] == 168
    facts = json.loads((work / "labels/music8/teacher.json").read_text())
    assert facts["config"]["features"]["kind"] == "cqt" and facts["num_classes"] == 8
    assert not list((work / "features/cqt").glob("*/*.npy")) and (work / "features/cqt/sample.npy").exists()
    assert report.ok


def test_refusing_another_teachers_labels_is_a_pipeline_error(tmp_path: Path) -> None:
    work = tmp_path / "w"
    manifest([str(music(tmp_path / "m", 2))], work, valid_percent=0.0)
    resample(work)
    features(work, sample_frames=1000)
    kmeans_fit(work, k=8, name="a")
    tokenize(work, kmeans_teacher(work), name="km")
    kmeans_fit(work, k=8, seed=1, name="b")
    with pytest.raises(PipelineError, match="holds labels of another teacher configuration"):
        tokenize(work, kmeans_teacher(work), name="km")
    assert tokenize(work, kmeans_teacher(work), name="km", replace=True).done > 0


def test_failed_tasks_are_stage_failed_with_the_report(tmp_path: Path) -> None:
    (tmp_path / "crash").touch()
    with pytest.raises(StageFailed, match="2 of 4 toy tasks failed") as caught:
        run_stage(ToyStage(tmp_path, n_tasks=4, crash_ranks=(1, 3)), ExecutorConfig(workers=1))
    assert [o.rank for o in caught.value.report.failed] == [1, 3]
    assert caught.value.errors_dir == tmp_path / ".work/toy/errors"
