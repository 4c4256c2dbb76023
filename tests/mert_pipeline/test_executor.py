"""The executor contract: skip finished tasks, isolate failures, survive SIGKILL, same bytes everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mert_pipeline.executor import ExecutorConfig, execute, marker_path, merged_stats_path
from tests.helpers import REPO, ToyStage, hidden_tmp_files, visible_files

LOCAL1 = ExecutorConfig(kind="local", workers=1)
LOCAL2 = ExecutorConfig(kind="local", workers=2)


def reference_outputs(tmp_path: Path) -> dict[str, bytes]:
    """An uninterrupted run's visible outputs, to compare interrupted and other-executor runs with."""
    ref = tmp_path / "reference"
    report = execute(ToyStage(ref), LOCAL1)
    assert report.ok and report.done == 8
    return visible_files(ref)


outputs = visible_files


def test_rerun_skips_finished_tasks_and_force_redoes_them(tmp_path: Path) -> None:
    stage = ToyStage(tmp_path / "w")
    first = execute(stage, LOCAL2)
    assert (first.tasks, first.done, first.skipped, first.failed) == (8, 8, 0, [])
    assert first.stats == {"chars": 8 * 6400, "items": 8}
    before = outputs(stage.workdir)

    again = execute(stage, LOCAL2)
    assert (again.done, again.skipped) == (0, 8)
    assert again.stats == first.stats, "skipped tasks still count in the merged stats"
    assert outputs(stage.workdir) == before

    forced = execute(stage, ExecutorConfig(kind="local", workers=2, force=True))
    assert (forced.done, forced.skipped) == (8, 0)
    assert outputs(stage.workdir) == before

    stats = json.loads(merged_stats_path(stage).read_text())
    assert stats["tasks"] == {"total": 8, "done": 8, "skipped": 0, "failed": 0}
    assert stats["counters"]["items"] == 8


def test_changed_fingerprint_reruns_only_that_task(tmp_path: Path) -> None:
    stage = ToyStage(tmp_path / "w")
    execute(stage, LOCAL1)
    marker_path(stage, 5).write_text("made by another version of the inputs")
    report = execute(stage, LOCAL1)
    assert (report.done, report.skipped) == (1, 7)


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_task_is_isolated_and_retried_by_rerun(tmp_path: Path, workers: int) -> None:
    expected = reference_outputs(tmp_path)
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "crash").touch()
    stage = ToyStage(workdir, crash_ranks=(2, 6))
    config = ExecutorConfig(kind="local", workers=workers)

    report = execute(stage, config)
    assert [o.rank for o in report.failed] == [2, 6]
    assert report.failed[0].error == "ValueError: boom in task 2"
    assert report.done == 6
    assert not (workdir / "result.txt").exists(), "finalize must wait for every task"
    assert "boom in task 2" in (workdir / ".work/toy/errors/00002.txt").read_text()

    (workdir / "crash").unlink()
    rerun = execute(stage, config)
    assert (rerun.done, rerun.skipped, rerun.failed) == (2, 6, [])
    assert not (workdir / ".work/toy/errors/00002.txt").exists()
    assert outputs(workdir) == expected


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mert_pipeline.executor import ExecutorConfig, execute
    from tests.helpers import ToyStage
    execute(ToyStage(Path(sys.argv[1]), kill_rank=3), ExecutorConfig(kind="local", workers=1))
    """
)


def test_sigkill_of_the_whole_run_then_rerun_resumes(tmp_path: Path) -> None:
    expected = reference_outputs(tmp_path)
    workdir = tmp_path / "w"
    workdir.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(workdir)], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()

    finished = sorted(p.name for p in (workdir / ".work/toy/completions").iterdir())
    assert finished == ["00000", "00001", "00002"]
    written = sorted(p.name for p in (workdir / ".work/toy/out").iterdir() if not p.name.startswith("."))
    assert written == ["00000.txt", "00001.txt", "00002.txt"], "the killed task's file must stay invisible"
    assert not (workdir / "result.txt").exists()
    assert len(hidden_tmp_files(workdir)) == 1, "the half-written file exists only under a temporary name"

    report = execute(ToyStage(workdir, kill_rank=3), LOCAL1)
    assert (report.done, report.skipped, report.failed) == (5, 3, [])
    assert hidden_tmp_files(workdir) == [], "a rerun cleans temporaries of killed writers"
    assert outputs(workdir) == expected


def test_sigkill_of_a_pool_worker_fails_its_tasks_and_rerun_resumes(tmp_path: Path) -> None:
    expected = reference_outputs(tmp_path)
    workdir = tmp_path / "w"
    stage = ToyStage(workdir, kill_rank=3)
    report = execute(stage, LOCAL2)
    assert not report.ok
    assert 3 in [o.rank for o in report.failed]
    assert all("worker process died" in (o.error or "") for o in report.failed)
    assert not (workdir / "result.txt").exists()

    finished = len(list((workdir / ".work/toy/completions").iterdir()))
    assert finished == report.done, "tasks that finished before the pool broke are reported as done"
    rerun = execute(stage, LOCAL2)
    assert rerun.ok and (rerun.skipped, rerun.done) == (finished, 8 - finished)
    assert outputs(workdir) == expected


@pytest.mark.ray
def test_ray_executor_matches_local_and_retries_a_killed_worker(tmp_path: Path, ray_cluster: None) -> None:
    expected = reference_outputs(tmp_path)
    workdir = tmp_path / "w"
    report = execute(ToyStage(workdir, kill_rank=3), ExecutorConfig(kind="ray", max_retries=2))
    assert report.ok, report.failed
    assert report.done == 8
    assert (workdir / ".killed-3").exists(), "the worker really died once and Ray retried the task"
    assert outputs(workdir) == expected

    again = execute(ToyStage(workdir), ExecutorConfig(kind="ray"))
    assert (again.done, again.skipped) == (0, 8)


@pytest.mark.ray
def test_ray_task_exception_is_not_retried(tmp_path: Path, ray_cluster: None) -> None:
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "crash").touch()
    report = execute(ToyStage(workdir, crash_ranks=(1,)), ExecutorConfig(kind="ray", max_retries=3))
    assert [o.rank for o in report.failed] == [1]
    assert report.failed[0].error == "ValueError: boom in task 1"


@pytest.mark.ray
def test_ray_tasks_reserve_the_requested_resources(tmp_path: Path, ray_cluster: None) -> None:
    report = execute(ToyStage(tmp_path / "w"), ExecutorConfig(kind="ray", cpus_per_task=0.5))
    assert report.ok and report.stats["ray_cpus"] == pytest.approx(8 * 0.5)
