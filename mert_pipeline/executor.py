"""Run a stage's tasks locally or on Ray, through one shared `run_task` path (datatrove's shape).

A stage is plain logic over one task: it plans a list of `Task`s on the driver, runs each task on a
worker, and finalizes on the driver once every task is complete. Executors only schedule. Every task
goes through `run_task`, which

1. skips the task if its completion marker exists and holds the task's fingerprint (a hash of the task's
   inputs and the stage config, so changed inputs or options re-run the task),
2. runs it (the stage writes its outputs under task-named paths, atomically),
3. writes the task's stats, then
4. writes the completion marker.

A killed run therefore leaves only whole outputs behind and a rerun redoes only unfinished tasks.
Errors inside a task are caught, written to `errors/RANK.txt` and reported as a failed task: the
other tasks still run, and a rerun retries the failed ones. Ray retries only infrastructure failures
(a worker process that died), never an exception raised by the stage's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from mert_pipeline.fs import atomic_write_json, atomic_write_text, remove_stale_tmp
from mert_pipeline.layout import bookkeeping_dir, stage_stats
from mert_pipeline.stats import merge_stats


@dataclass(frozen=True)
class Task:
    """One unit of scheduling. `size` counts work items (files) for progress and summaries."""

    rank: int
    fingerprint: str
    size: int = 1


@dataclass(frozen=True)
class Resources:
    """What one task needs from the scheduler (Ray honours it; the local pool runs one task per worker).

    `model`: the stage loads a model (a codec, a network). On Ray its tasks then run on a pool of
    long-lived actors, each holding the model for the whole run, instead of on Ray tasks, whose worker
    processes may come and go. (Local pool workers are long-lived already.)"""

    cpus: float = 1.0
    gpus: float = 0.0
    model: bool = False


class Stage(Protocol):
    """The contract every stage fulfils. Stages must be picklable: they travel to worker processes."""

    name: str
    workdir: Path  # the run's WORKDIR; task bookkeeping lives in WORKDIR/.work/NAME
    resources: Resources

    def plan(self) -> list[Task]: ...

    def run(self, task: Task, stats: Counter) -> None: ...

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TaskOutcome:
    rank: int
    status: Literal["done", "skipped", "failed"]
    stats: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    node: str = ""  # the Ray node that ran the task ("" locally): shows where a cluster ran the work


def _rank_name(rank: int) -> str:
    return f"{rank:05d}"


def stage_dir(stage: Stage) -> Path:
    """Where a stage keeps per-task bookkeeping and intermediate outputs."""
    return bookkeeping_dir(stage.workdir, stage.name)


def rank_path(stage: Stage, sub: str, rank: int, suffix: str = "") -> Path:
    """A task's own file in the stage's bookkeeping (`.work/NAME/SUB/RANK.SUFFIX`): listings, parts,
    rejects, journals; named by rank so a rerun overwrites exactly its own."""
    return stage_dir(stage) / sub / f"{_rank_name(rank)}{suffix}"


def merged_stats_path(stage: Stage) -> Path:
    return stage_stats(stage.workdir, stage.name)


def marker_path(stage: Stage, rank: int) -> Path:
    return stage_dir(stage) / "completions" / _rank_name(rank)


def stats_path(stage: Stage, rank: int) -> Path:
    return stage_dir(stage) / "stats" / f"{_rank_name(rank)}.json"


def error_path(stage: Stage, rank: int) -> Path:
    return stage_dir(stage) / "errors" / f"{_rank_name(rank)}.txt"


def is_complete(stage: Stage, task: Task) -> bool:
    try:
        return marker_path(stage, task.rank).read_text() == task.fingerprint
    except FileNotFoundError:
        return False


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_task(stage: Stage, task: Task) -> TaskOutcome:
    """The single path every executor takes for a task: skip if done, run, write stats, then the marker."""
    if is_complete(stage, task):
        try:
            saved = json.loads(stats_path(stage, task.rank).read_text())
            return TaskOutcome(task.rank, "skipped", saved["stats"], saved["seconds"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass  # marker without readable stats: run again rather than report wrong totals
    start = time.perf_counter()
    stats: Counter = Counter()
    try:
        stage.run(task, stats)
    except Exception as exc:  # noqa: BLE001 - a task's failure must not take the whole run down
        atomic_write_text(error_path(stage, task.rank), traceback.format_exc())
        return TaskOutcome(task.rank, "failed", error=one_line(exc))
    seconds = time.perf_counter() - start
    clean = {key: stats[key] for key in sorted(stats)}
    atomic_write_json(stats_path(stage, task.rank), {"rank": task.rank, "stats": clean, "seconds": seconds})
    with contextlib.suppress(FileNotFoundError):
        error_path(stage, task.rank).unlink()
    atomic_write_text(marker_path(stage, task.rank), task.fingerprint)
    return TaskOutcome(task.rank, "done", clean, seconds)


@dataclass(frozen=True)
class ExecutorConfig:
    """How to schedule tasks. `workers`: processes of the local pool (or CPUs of the local Ray started);
    None lets each stage choose its own (`pipeline.scheduled`), one per core when run directly."""

    kind: Literal["local", "ray"] = "local"
    workers: int | None = None
    ray_address: str | None = None
    cpus_per_task: float | None = None  # None: the stage's own default
    gpus_per_task: float | None = None
    max_retries: int = 3  # Ray only: retries of tasks whose worker died
    force: bool = False


@dataclass
class StageReport:
    """What a stage run did: task counts, merged stats, finalize's summary, wall time."""

    stage: str
    tasks: int
    done: int
    skipped: int
    failed: list[TaskOutcome]
    stats: dict[str, float]
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


ProgressFn = Callable[[TaskOutcome, Task], None]


def execute(
    stage: Stage,
    config: ExecutorConfig,
    on_task: ProgressFn | None = None,
    on_plan: Callable[[list[Task]], Any] | None = None,
) -> StageReport:
    """Plan, run every task on the chosen executor, and finalize when all tasks are complete."""
    start = time.perf_counter()
    if config.kind not in ("local", "ray"):
        raise ValueError(f"--executor must be 'local' or 'ray', not {config.kind!r}")
    if config.workers is None:
        config = dataclasses.replace(config, workers=max(1, os.cpu_count() or 1))
    remove_stale_tmp(stage_dir(stage))
    if config.force:
        for sub in ("completions", "stats", "errors"):
            for path in sorted((stage_dir(stage) / sub).glob("*")):
                path.unlink()
    tasks = stage.plan()
    if on_plan is not None:
        on_plan(tasks)
    by_rank = {task.rank: task for task in tasks}
    runner = _run_local if config.kind == "local" else _run_ray
    done = {task.rank for task in tasks if is_complete(stage, task)}
    todo = [task for task in tasks if task.rank not in done]
    # tasks done before are read back here (their saved stats): a runner gets only what is left, so a
    # stage with nothing to do starts no pool, no Ray and no worker
    finished = (run_task(stage, task) for task in tasks if task.rank in done)
    outcomes: list[TaskOutcome] = []
    for outcome in itertools.chain(finished, runner(stage, todo, config) if todo else ()):
        outcomes.append(outcome)
        if on_task is not None:
            on_task(outcome, by_rank[outcome.rank])
    outcomes.sort(key=lambda o: o.rank)
    failed = [o for o in outcomes if o.status == "failed"]
    merged = merge_stats(o.stats for o in outcomes if o.status != "failed")
    report = StageReport(
        stage=stage.name,
        tasks=len(tasks),
        done=sum(o.status == "done" for o in outcomes),
        skipped=sum(o.status == "skipped" for o in outcomes),
        failed=failed,
        stats=merged,
        seconds=0.0,
    )
    if not failed:
        report.summary = stage.finalize(tasks, merged)
    report.seconds = time.perf_counter() - start
    atomic_write_json(
        merged_stats_path(stage),
        {
            "stage": stage.name,
            "executor": config.kind,
            "workers": config.workers,
            "tasks": {
                "total": report.tasks,
                "done": report.done,
                "skipped": report.skipped,
                "failed": len(failed),
            },
            "failures": [{"rank": o.rank, "error": o.error} for o in failed],
            "nodes": dict(sorted(Counter(o.node for o in outcomes if o.node and o.status == "done").items())),
            "counters": merged,
            "summary": report.summary,
            "wall_seconds": round(report.seconds, 3),
        },
    )
    return report


def _bounded(
    tasks: Iterable[Task],
    submit: Callable[[Task], Any],
    wait_some: Callable[[list[Any]], tuple[list, list]],
    limit: int,
) -> Iterator[tuple[Any, Task]]:
    """Keep at most `limit` tasks in flight so the driver's memory does not grow with the task count."""
    pending: dict[Any, Task] = {}
    queue = iter(tasks)
    exhausted = False
    while True:
        while not exhausted and len(pending) < limit:
            task = next(queue, None)
            if task is None:
                exhausted = True
                break
            pending[submit(task)] = task
        if not pending:
            return
        done, _ = wait_some(list(pending))
        for handle in done:
            yield handle, pending.pop(handle)


def _run_local(stage: Stage, todo: list[Task], config: ExecutorConfig) -> Iterator[TaskOutcome]:
    """A process pool of `workers` processes; one worker runs in-process (simplest to debug)."""
    if config.workers <= 1:
        for task in todo:
            yield run_task(stage, task)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch/ray threads exist
    lost: list[Task] = []  # tasks in flight when a worker died; judged once every worker has exited
    hidden = MainHidden(stage)
    with (
        hidden,
        ProcessPoolExecutor(
            max_workers=config.workers, mp_context=context, initializer=_die_with_parent
        ) as pool,
    ):

        def submit(task: Task) -> Future:
            try:
                return pool.submit(run_task, stage, task)
            except BrokenProcessPool as exc:  # an earlier worker died: the rest fail, a rerun resumes
                failed: Future = Future()
                failed.set_exception(exc)
                return failed

        def wait_some(handles: list[Future]) -> tuple[list, list]:
            done, rest = wait(handles, return_when=FIRST_COMPLETED)
            return list(done), list(rest)

        for future, task in _bounded(todo, submit, wait_some, limit=2 * config.workers):
            try:
                outcome = future.result()
            except BrokenProcessPool:
                lost.append(task)
                continue
            with hidden.shown():  # the caller's code runs with its __main__ as it was
                yield outcome
    for task in lost:  # a task may have completed before its pool was torn down
        if is_complete(stage, task):
            yield dataclasses.replace(run_task(stage, task), status="done")
        else:
            yield TaskOutcome(
                task.rank, "failed", error="a worker process died (killed or crashed); rerun to resume"
            )


class MainHidden:
    """While the pool spawns its workers, the caller's `__main__` has no `__file__` and no `__spec__`.

    multiprocessing's spawn start method makes each worker import the parent's main module again (as
    `__mp_main__`): a user's script without an `if __name__ == "__main__":` guard would run its top level,
    `run_pipeline` included, in every worker, and a script read from standard input fails there
    (`<stdin>` is no file). The workers need nothing from it (stages and tasks are classes of this
    package), so they start from this package alone, as after `python -c`. A stage whose class the
    caller's script defines does need it: then nothing is hidden. `shown()` puts it back while control is
    with the caller between results; a pool spawns its workers only inside `submit` (and `map`), so every
    spawning pool of the package submits inside one of these.
    """

    _NAMES = ("__file__", "__spec__")

    def __init__(self, stage: Stage | None = None) -> None:
        main = sys.modules.get("__main__")
        needed = stage is not None and type(stage).__module__ in ("__main__", "__mp_main__")
        self.main = None if needed else main
        self.saved = {n: main.__dict__[n] for n in self._NAMES if n in main.__dict__} if self.main else {}

    def __enter__(self) -> MainHidden:
        if self.main is not None:
            self.main.__dict__.pop("__file__", None)
            if "__spec__" in self.saved:
                self.main.__spec__ = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.main is not None:
            self.main.__dict__.update(self.saved)

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


def _die_with_parent() -> None:
    """Pool workers exit when the driver dies (Linux): otherwise a killed run's workers go on with their
    current task, which can be long, on cores a rerun needs. Their half-written outputs are temporaries."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() == 1:  # the driver died before prctl took effect
            os._exit(1)


@dataclass
class _RaySession:
    """A `session` in force: whether a stage inside it started (or connected) Ray, and whether that Ray
    is a local one this process started (then each stage keeps to its own worker count on it)."""

    started: bool = False
    local: bool = False


_SESSIONS: list[_RaySession] = []  # open sessions, innermost last


@contextlib.contextmanager
def session(config: ExecutorConfig) -> Iterator[None]:
    """One Ray for every stage run inside (a `run`, `run_pipeline`, `iterate`): the first stage with work
    to do starts a local Ray or connects to the cluster, later stages reuse it (and a model stage's actors
    start once per stage, not per Ray), and it is shut down when the session ends, only if a stage inside
    started it. A Ray the caller had initialised before is never shut down. The local executor needs none.
    """
    if config.kind != "ray":
        yield
        return
    state = _RaySession()
    _SESSIONS.append(state)
    try:
        yield
    finally:
        _SESSIONS.remove(state)
        if state.started:
            import ray

            ray.shutdown()


def _ray_up(config: ExecutorConfig) -> tuple[bool, bool]:
    """Start or connect Ray unless it is up: (whether this call did, whether that Ray is local to us)."""
    import ray  # imported here so local runs never pay for it

    if ray.is_initialized():
        return False, any(s.local for s in _SESSIONS)
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return True, False
    ray.init(
        address="local",  # a new cluster even when `ray start` left one (or its address file)
        num_cpus=max(1, os.cpu_count() or 1) if _SESSIONS else max(1, config.workers or 1),
        num_gpus=None,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=True,
    )
    return True, True


def _run_ray(stage: Stage, todo: list[Task], config: ExecutorConfig) -> Iterator[TaskOutcome]:
    """The same tasks as Ray tasks (or actors, for a model stage), on the Ray of the `session` in force,
    else on a Ray started for this stage (`execute` passes only the tasks left to do)."""
    import ray

    started_here, local = _ray_up(config)
    if started_here and _SESSIONS:
        _SESSIONS[-1].started, _SESSIONS[-1].local = True, local
    try:
        cpus = config.cpus_per_task if config.cpus_per_task is not None else stage.resources.cpus
        gpus = config.gpus_per_task if config.gpus_per_task is not None else stage.resources.gpus
        most = max(1, config.workers or 1) if local else None  # a shared local Ray: this stage's own count
        if stage.resources.model:
            yield from _run_ray_actors(stage, todo, config, cpus, gpus, most)
            return
        remote = ray.remote(_run_task_on_ray).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=config.max_retries, retry_exceptions=False
        )
        stage_ref = ray.put(stage)
        capacity = max(1, int(ray.cluster_resources().get("CPU", 1) / max(cpus, 1e-3)))
        capacity = min(capacity, most) if most else capacity

        def wait_some(handles: list[Any]) -> tuple[list, list]:
            return ray.wait(handles, num_returns=1)

        for ref, task in _bounded(todo, lambda t: remote.remote(stage_ref, t), wait_some, limit=2 * capacity):
            try:
                yield ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - retries exhausted: report, keep the others going
                yield TaskOutcome(task.rank, "failed", error=f"ray: {one_line(exc)}")
    finally:
        if started_here and not _SESSIONS:
            ray.shutdown()


class _TaskRunner:
    """A Ray actor that runs tasks through `run_task`; the stage's model, cached per process by the
    stage, therefore loads once per actor."""

    def run(self, stage: Stage, task: Task) -> TaskOutcome:
        return _run_task_on_ray(stage, task)


def _run_task_on_ray(stage: Stage, task: Task) -> TaskOutcome:
    import ray

    return dataclasses.replace(run_task(stage, task), node=ray.get_runtime_context().get_node_id())


def _run_ray_actors(
    stage: Stage, todo: list[Task], config: ExecutorConfig, cpus: float, gpus: float, most: int | None
) -> Iterator[TaskOutcome]:
    """Feed the tasks left to do to a pool of actors (at most `most`), one task in flight per actor (the
    driver holds at most one result per actor). An actor whose process dies is restarted by Ray and its
    task retried, up to `max_retries` times; after that its task fails and the pool goes on with the
    actors left."""
    import ray
    from ray.exceptions import RayActorError

    resources = ray.cluster_resources()
    if gpus > 0:
        capacity = int(resources.get("GPU", 0) / gpus)
        if capacity < 1:
            raise RuntimeError(f"the Ray cluster has no GPU for a {gpus:g}-GPU actor")
    else:
        capacity = int(resources.get("CPU", 1) / max(cpus, 1e-3))
    actor_class = ray.remote(_TaskRunner).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_restarts=config.max_retries,
        max_task_retries=config.max_retries,
    )
    capacity = min(capacity, most) if most else capacity
    actors = [actor_class.remote() for _ in range(max(1, min(capacity, len(todo))))]
    stage_ref = ray.put(stage)
    queue = iter(todo)
    pending: dict[Any, tuple[Any, Task]] = {}

    def feed(actor: Any) -> None:
        task = next(queue, None)
        if task is not None:
            pending[actor.run.remote(stage_ref, task)] = (actor, task)

    for actor in actors:
        feed(actor)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor, task = pending.pop(ref)
            try:
                yield ray.get(ref)
            except RayActorError as exc:  # restarts exhausted: this actor is gone for good
                yield TaskOutcome(task.rank, "failed", error=f"ray actor died: {one_line(exc)}")
                actors.remove(actor)
                if not actors:  # nothing left to run the queue on: fail what remains, a rerun resumes
                    for rest in queue:
                        yield TaskOutcome(rest.rank, "failed", error="every Ray actor died; rerun to resume")
                continue
            except Exception as exc:  # noqa: BLE001 - report, keep the others going
                yield TaskOutcome(task.rank, "failed", error=f"ray: {one_line(exc)}")
            feed(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
