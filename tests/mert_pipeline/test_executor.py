"""The executor contract: skip finished tasks, isolate failures, survive SIGKILL, same bytes everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mert_pipeline.executor import ExecutorConfig, Resources, execute, marker_path, merged_stats_path
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

    # a worker the broken pool terminates mid-write leaves a hidden temporary, not a marker: not counted
    finished = len([p for p in (workdir / ".work/toy/completions").iterdir() if not p.name.startswith(".")])
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


@pytest.mark.ray
def test_ray_actor_pool_matches_local_and_restarts_a_killed_actor(tmp_path: Path, ray_cluster: None) -> None:
    """Model stages run on long-lived actors: a SIGKILLed actor is restarted and its task retried."""
    expected = reference_outputs(tmp_path)
    workdir = tmp_path / "w"
    stage = ToyStage(workdir, kill_rank=3, resources=Resources(model=True))
    report = execute(stage, ExecutorConfig(kind="ray", max_retries=2))
    assert report.ok, report.failed
    assert report.done == 8
    assert (workdir / ".killed-3").exists(), "the actor really died once and Ray retried its task"
    assert outputs(workdir) == expected
    nodes = json.loads(merged_stats_path(stage).read_text())["nodes"]
    assert sum(nodes.values()) == 8, "every task reports the Ray node that ran it"

    again = execute(ToyStage(workdir, resources=Resources(model=True)), ExecutorConfig(kind="ray"))
    assert (again.done, again.skipped) == (0, 8)


@pytest.mark.ray
def test_ray_actor_that_keeps_dying_fails_only_its_task(tmp_path: Path, ray_cluster: None) -> None:
    workdir = tmp_path / "w"
    workdir.mkdir()
    stage = ToyStage(workdir, kill_rank=3, resources=Resources(model=True))
    # max_retries=0: no restart, so the one kill is final; the other tasks still finish
    report = execute(stage, ExecutorConfig(kind="ray", max_retries=0))
    assert [o.rank for o in report.failed] == [3]
    assert "actor died" in (report.failed[0].error or "")
    assert report.done == 7
    rerun = execute(stage, ExecutorConfig(kind="ray", max_retries=0))
    assert rerun.ok and (rerun.done, rerun.skipped) == (1, 7)


RAY_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mert_pipeline.executor import ExecutorConfig, Resources, execute
    from tests.helpers import ToyStage
    workdir, address, delay, model = Path(sys.argv[1]), sys.argv[2] or None, float(sys.argv[3]), sys.argv[4]
    stage = ToyStage(workdir, delay=delay, resources=Resources(model=model == "actors"))
    report = execute(stage, ExecutorConfig(kind="ray", workers=2, ray_address=address))
    assert report.ok, report.failed
    """
)


# Ray's token authentication (on by default for `ray start --head` since Ray 2.5x) would need the token
# on every node; a test cluster on one machine turns it off for its nodes and its driver.
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def ray_node(*args: str) -> Iterator[None]:
    """One Ray node of a real cluster on this machine (`ray start --block`), up while the block runs.
    Stopping it by SIGTERM stops only this node, never other Ray clusters of the machine."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    proc = subprocess.Popen(
        [ray_cli, "start", *args, *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=RAY_ENV,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "block forever" in line:
                break
        else:
            raise RuntimeError("ray start failed:\n" + "".join(lines[-30:]))
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=120)


@pytest.mark.ray
def test_two_node_ray_cluster_runs_tasks_on_both_nodes(tmp_path: Path) -> None:
    """A head node plus a second node joined by address (`ray start --head` / `ray start --address`), one
    CPU each: a driver connects by address, and the stats show tasks done on both nodes, for Ray tasks
    and for the actor pool alike (one cluster for both: starting one costs seconds)."""
    expected = reference_outputs(tmp_path)
    port = 6390 + (os.getpid() % 200)
    address = f"127.0.0.1:{port}"
    runs = {}
    with ray_node("--head", f"--port={port}", "--include-dashboard=false"), ray_node(f"--address={address}"):
        for mode in ("tasks", "actors"):
            runs[mode] = subprocess.run(
                [sys.executable, "-c", RAY_DRIVER, str(tmp_path / mode), address, "1.0", mode],
                cwd=REPO,
                capture_output=True,
                timeout=300,
                env=RAY_ENV,
            )
    for mode, proc in runs.items():
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        nodes = json.loads((tmp_path / mode / "stats/toy.json").read_text())["nodes"]
        assert len(nodes) == 2 and sum(nodes.values()) == 8, (mode, nodes)
        assert outputs(tmp_path / mode) == expected


@pytest.mark.ray
def test_sigkill_of_a_ray_driver_then_rerun_resumes(tmp_path: Path) -> None:
    """Kill the driver (and so its local Ray) mid-stage; rerunning the same command finishes the job
    from the completion markers, with the same bytes as an uninterrupted run."""
    expected = reference_outputs(tmp_path)
    workdir = tmp_path / "w"
    driver = [sys.executable, "-c", RAY_DRIVER, str(workdir), "", "0.5", "actors"]
    proc = subprocess.Popen(driver, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = workdir / ".work/toy/completions"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(markers.glob("*"))) < 2 and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    finished = len(list(markers.glob("*")))
    assert 2 <= finished < 8, "the driver died mid-stage"
    assert not (workdir / "result.txt").exists()
    rerun = subprocess.run(driver, cwd=REPO, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    stats = json.loads((workdir / "stats/toy.json").read_text())
    assert stats["tasks"]["skipped"] >= finished and stats["tasks"]["done"] + stats["tasks"]["skipped"] == 8
    assert outputs(workdir) == expected


POOL_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mert_pipeline.executor import ExecutorConfig, execute
    from tests.helpers import ToyStage
    execute(ToyStage(Path(sys.argv[1]), delay=120.0), ExecutorConfig(kind="local", workers=2))
    """
)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat, the parent's pid
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_pool_workers_die_with_a_killed_driver(tmp_path: Path) -> None:
    """A SIGKILLed driver takes its pool workers with it, instead of leaving them on their (long) tasks."""
    proc = subprocess.Popen([sys.executable, "-c", POOL_DRIVER, str(tmp_path / "w")], cwd=REPO)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2, "the pool did not start"
    time.sleep(1.0)  # the workers are inside their 120 s tasks
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()]
    for pid in alive:
        os.kill(pid, 9)
    assert not alive, "pool workers outlived their driver"


SESSION_SCRIPT = """
import json, sys, time
import ray
from mert_pipeline import PipelineConfig, run_pipeline
from mert_pipeline.executor import ExecutorConfig

starts = []
real_init = ray.init
def counted_init(*args, **kwargs):  # the real ray.init, counted
    starts.append(kwargs.get("address"))
    return real_init(*args, **kwargs)
ray.init = counted_init

config = PipelineConfig(roots=[sys.argv[1]], workdir=sys.argv[2], teachers=("kmeans8",))
ray_executor = ExecutorConfig(kind="ray", workers=2)
first = run_pipeline(config, ray_executor)
after_first = {"starts": len(starts), "up": ray.is_initialized(), "ok": first.ok}
begin = time.perf_counter()
again = run_pipeline(config, ray_executor)
print(json.dumps({
    "first": after_first,
    "rerun": {"starts": len(starts) - after_first["starts"], "seconds": time.perf_counter() - begin,
              "done": sum(r.done for r in again.stages), "ok": again.ok},
}))
"""


def test_one_ray_per_run_and_none_for_a_rerun_with_nothing_to_do(tmp_path: Path) -> None:
    """A fresh process: `run_pipeline` on Ray starts one local Ray for all of its stages and shuts it down
    at the end; a rerun with every task done starts none (each stage reads its tasks back)."""
    from tests.mert_pipeline.test_pipeline import music

    done = subprocess.run(
        [sys.executable, "-c", SESSION_SCRIPT, str(music(tmp_path / "music", 2)), str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["first"] == {"starts": 1, "up": False, "ok": True}, result
    assert result["rerun"]["starts"] == 0 and result["rerun"]["done"] == 0 and result["rerun"]["ok"], result
