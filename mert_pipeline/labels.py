"""Label sets on disk: what `tokenize` wrote under WORKDIR/labels/NAME, read by `shard`, `export fairseq`,
`stats` and `kmeans report`.

A label set is `labels.parquet` (one `LabelRecord` per file: relpath of its `.npy`, config hash, sample
count), `teacher.json` (the teacher's facts: kind, n_q, num_classes, hop, config hash) and one int16 `.npy`
of shape (n_q, ceil(num_samples / hop)) per file. Every reader checks a file's labels cover exactly its
audio before using them (`load_aligned`, `label_columns`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from mert_pipeline.fs import atomic_write_json
from mert_pipeline.grid import num_frames
from mert_pipeline.layout import LabelSet, Workdir, id_numbers, is_id
from mert_pipeline.shards import ShardError
from mert_pipeline.teachers.kmeans import JointCounts, KMeansTeacher, fitted_teacher, usage_from_counts

if TYPE_CHECKING:
    from mert_pipeline.probe import ProbeData

TEACHER_META = (
    "mert_pipeline.teacher"  # labels.parquet metadata key: the teacher's facts (teacher.json) as JSON
)


class LabelsError(ValueError):
    """Label sets that cannot be read or reported on, named in one line."""


def label_sets(workdir: Path, finished: bool = True) -> dict[str, dict[str, Any]]:
    """Label sets under WORKDIR/labels, by name: their teacher.json. `finished`: only those whose
    labels.parquet exists (tokenize has finalized them)."""
    found = {}
    for label_set in Workdir(workdir).label_sets():
        if not finished or label_set.manifest.exists():
            found[label_set.name] = json.loads(label_set.teacher.read_text())
    return found


def teacher_facts(workdir: Path, names: list[str] | None) -> dict[str, dict[str, Any]]:
    """The selected teachers (all found when `names` is None), checked to be complete and aligned."""
    layout = Workdir(workdir)
    found = label_sets(workdir, finished=False)
    if names is None:
        names = sorted(found)
    if not names:
        raise ValueError(f"no labels under {layout.labels_root}: run `mert-pipe tokenize {workdir}` first")
    facts = {}
    for name in names:
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise ValueError(f"no teacher {name!r} under {layout.labels_root} (found: {known})")
        if not layout.labels(name).manifest.exists():
            raise ValueError(f"{layout.labels(name).manifest} not found: let `tokenize` finish first")
        facts[name] = found[name]
    rates = {(f["sampling_rate"], f["hop"]) for f in facts.values()}
    if len(rates) != 1:
        raise ValueError(f"the teachers disagree on sample rate and hop: {sorted(rates)}")
    return facts


def load_labels(label_set: LabelSet) -> dict[str, tuple[str, str, int]]:
    """id -> (relpath, config_hash, num_samples) of one label set."""
    columns = ["id", "relpath", "config_hash", "num_samples"]
    table = pq.read_table(label_set.manifest, columns=columns)
    columns = [table.column(name).to_pylist() for name in ("id", "relpath", "config_hash", "num_samples")]
    return {row[0]: (row[1], row[2], row[3]) for row in zip(*columns, strict=True)}


@dataclass(frozen=True)
class LabelIndex:
    """One label set's labels.parquet as columns sorted by id, joined to manifest rows by id: a few dozen
    bytes a file where a dict of rows took several hundred, so a 3M-file corpus plans on one driver."""

    ids: np.ndarray  # uint64 (`layout.id_numbers`), sorted; rows with an invalid id are left out
    relpath_ok: np.ndarray  # bool: the row's .npy is a relative path that stays inside the folder
    relpath: Any  # pyarrow strings, in `ids` order (for messages)
    config_hash: Any  # pyarrow strings, in `ids` order
    num_samples: np.ndarray  # int64

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The row of each id (uint64) in this index, or -1; of rows with one id, the last counts."""
        at = np.searchsorted(self.ids, ids, side="right") - 1
        found = at >= 0
        found[found] = self.ids[at[found]] == ids[found]
        return np.where(found, at, -1)

    def get(self, file_id: str) -> tuple[str, str, int] | None:
        """(relpath, config_hash, num_samples) of one id's labels, or None (no such id, or not an id)."""
        if not is_id(file_id):
            return None
        at = int(self.find(np.array([int(file_id, 16)], dtype=np.uint64))[0])
        if at < 0:
            return None
        return self.relpath[at].as_py(), self.config_hash[at].as_py(), int(self.num_samples[at])

    def matches(self, at: np.ndarray, num_samples: np.ndarray, config_hash: str) -> np.ndarray:
        """Whether the labels at rows `at` (from `find`; -1 is no match) are of `num_samples` samples, of
        the teacher configuration `config_hash`, and inside their folder."""
        import pyarrow.compute as pc

        if not len(self.ids):
            return np.zeros(len(at), dtype=bool)
        hit = np.maximum(at, 0)
        same_hash = pc.fill_null(pc.equal(self.config_hash.take(hit), config_hash), False)
        same = np.asarray(same_hash.to_numpy(zero_copy_only=False), dtype=bool)
        return (at >= 0) & same & self.relpath_ok[hit] & (self.num_samples[hit] == num_samples)


def label_index(label_set: LabelSet) -> LabelIndex:
    """`LabelIndex` of a label set. A relpath that is absolute or climbs out of the folder (a crafted
    labels.parquet) is kept but marked, so the file that names it is rejected before a path is built."""
    import pyarrow.compute as pc

    table = pq.read_table(label_set.manifest, columns=["id", "relpath", "config_hash", "num_samples"])
    numbers, valid = id_numbers(table.column("id"))
    relpath = table.column("relpath")
    outside = pc.match_substring_regex(relpath, r"^$|^/|(^|/)\.\.(/|$)")
    relpath_ok = ~np.asarray(pc.fill_null(outside, True).to_numpy(zero_copy_only=False), dtype=bool)
    keep = np.flatnonzero(valid)
    order = keep[np.argsort(numbers[keep], kind="stable")]
    return LabelIndex(
        ids=numbers[order],
        relpath_ok=relpath_ok[order],
        relpath=relpath.take(order).combine_chunks(),  # one chunk each: `take` on them is fast
        config_hash=table.column("config_hash").take(order).combine_chunks(),
        num_samples=table.column("num_samples").to_numpy()[order],
    )


def load_aligned(path: Path, n_q: int, num_samples: int, hop: int) -> np.ndarray:
    """A file's labels, memory-mapped, after checking they cover exactly its audio; else a ShardError."""
    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable labels ({exc})") from exc
    expected = (n_q, num_frames(num_samples, hop))
    if labels.dtype != np.int16 or labels.shape != expected:
        raise ShardError(
            f"{path}: labels are {labels.dtype}{labels.shape} but the audio has {num_samples} samples, "
            f"so int16{expected} (frames = ceil(num_samples / {hop})); rerun tokenize for this label set"
        )
    return labels


_NPY_INT16 = re.compile(rb"\{'descr': '<i2', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


def label_columns(path: Path, n_q: int, num_samples: int, hop: int, first: int, frames: int) -> np.ndarray:
    """`load_aligned(...)[:, first : first + frames]`, read with one pread per codebook: np.load's header
    parsing and np.memmap cost ten times the slice. Any file whose header or size is not exactly what
    np.save writes for int16 (n_q, ceil(num_samples / hop)) goes through load_aligned (its checks and
    messages)."""
    total = num_frames(num_samples, hop)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            head = os.pread(fd, 256, 0)
            start = 10 + int.from_bytes(head[8:10], "little")
            found = _NPY_INT16.fullmatch(head, 10, start) if head[:8] == b"\x93NUMPY\x01\x00" else None
            if found and (int(found[1]), int(found[2])) == (n_q, total) and first + frames <= total:
                if os.fstat(fd).st_size == start + 2 * n_q * total:
                    out = np.empty((n_q, frames), dtype=np.int16)
                    for row in range(n_q):
                        at = start + 2 * (row * total + first)
                        out[row] = np.frombuffer(os.pread(fd, 2 * frames, at), dtype="<i2")
                    return out
        finally:
            os.close(fd)
    return np.asarray(load_aligned(path, n_q, num_samples, hop)[:, first : first + frames])


def label_report(
    workdir: Path, teacher: str | None = None, probe_data: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Usage and agreement figures of label set `teacher` (default: every k-means label set, or every
    label set when none is k-means); each report also goes to WORKDIR/labels/NAME/report.json.

    `probe_data` (`probe_tasks` specs) adds, per k-means label set and task, how much its labels hold about
    the classes of labelled clips: the set's own teacher labels every clip's frames (`probe_quality`)."""
    tasks = probe_tasks(probe_data)
    sets = label_sets(workdir)
    if not sets:
        raise LabelsError(f"no label sets in {Workdir(workdir).labels_root}: run `mert-pipe tokenize` first")
    if teacher is not None:
        if teacher not in sets:
            found = ", ".join(sets)
            raise LabelsError(f"no label set {teacher!r} in {Workdir(workdir).labels_root} ({found})")
        targets = [teacher]
    else:
        targets = [name for name, facts in sets.items() if facts.get("kind") == "kmeans"] or list(sets)
    for name in targets if tasks else []:
        if (kind := sets[name].get("kind")) != "kmeans":
            raise LabelsError(f"--probe-data measures k-means label sets; {name!r} is {kind}")
    reports = {name: _report_one(workdir, name, sets) for name in targets}
    if tasks:
        from mert_pipeline.probe import load_probe_data  # torch: only when clips are labelled

        datasets = {task: load_probe_data(spec) for task, spec in tasks.items()}
        for name, report in reports.items():
            labeller = fitted_teacher(workdir, sets[name]["config"]["centroids_sha256"])
            report["probe"] = {task: probe_quality(labeller, data) for task, data in datasets.items()}
    for name, report in reports.items():
        atomic_write_json(Workdir(workdir).labels(name).report, report)
    return reports


def _relpaths(workdir: Path, name: str) -> dict[str, str]:
    return {file_id: row[0] for file_id, row in load_labels(Workdir(workdir).labels(name)).items()}


def _report_one(workdir: Path, name: str, sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    facts = sets[name]
    k, n_q = int(facts["num_classes"]), int(facts["n_q"])
    mine = _relpaths(workdir, name)
    if not mine:
        raise LabelsError(f"label set {name!r} holds no labels (see its rejects.jsonl)")
    others = {other: _relpaths(workdir, other) for other in sets if other != name}
    joints = {other: JointCounts(k, int(sets[other]["num_classes"])) for other in others}
    usage = np.zeros((n_q, k), dtype=np.int64)
    for file_id in sorted(mine):
        labels = np.load(Workdir(workdir).labels(name).npy(mine[file_id])).astype(np.int64)
        for row in range(n_q):
            usage[row] += np.bincount(labels[row], minlength=k)
        for other, relpaths in others.items():
            if file_id in relpaths:
                theirs = np.load(Workdir(workdir).labels(other).npy(relpaths[file_id]))
                joints[other].update(labels[0], theirs[0])
    return {
        "teacher": name,
        "kind": facts.get("kind"),
        "config_hash": facts.get("config_hash"),
        "num_classes": k,
        "files": len(mine),
        "usage": [{"codebook": row, **usage_from_counts(usage[row])} for row in range(n_q)],
        "agreement": {
            other: {"files": sum(1 for i in mine if i in others[other]), **joint.metrics()}
            for other, joint in joints.items()
            if joint.counts.sum()
        },
    }


def probe_tasks(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`kmeans report --probe-data` specs -> {task: data}: `TASK=DATA`, or DATA named by its file stem
    (`builtin:NAME` by NAME); DATA is what `mert-pipe probe --data` takes (a CSV of path,label, a folder of
    class folders, builtin:pitch or builtin:timbre)."""
    tasks: dict[str, str] = {}
    for spec in specs:
        task, _, data = spec.partition("=")
        if not data or not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
            task, data = (spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec).stem), spec
        if task in tasks:
            raise LabelsError(f"--probe-data names task {task!r} twice: name them TASK=DATA")
        if not data.startswith("builtin:") and not Path(data).exists():
            raise LabelsError(f"--probe-data {data}: no such CSV or folder")
        tasks[task] = data
    return tasks


def probe_quality(teacher: KMeansTeacher, data: ProbeData) -> dict[str, Any]:
    """What a k-means teacher's labels of labelled clips (a `probe.ProbeData`) hold about their classes,
    over every frame of every clip (fairseq's measure_teacher_quality with the class as the reference):
    MI(class; label) / H(class), the purity of the class given the label, NMI, MI in bits."""
    from mert_pipeline.probe import clip_blocks

    classes = sorted(set(data.labels))
    if len(classes) < 2:
        raise LabelsError(f"{data.name}: fewer than two classes with readable audio")
    counts = JointCounts(len(classes), teacher.num_classes)
    for clip, label in zip(data.clips, data.labels, strict=True):
        truth = classes.index(label)
        for labels in teacher.label_blocks(clip_blocks(clip)):
            counts.update(np.full(len(labels), truth), labels)
    m = counts.metrics()
    return {
        "data": data.name,
        "clips": len(data.clips),
        "rejects": len(data.rejects),
        "classes": len(classes),
        "frames": m["frames"],
        "mi_over_h_class": m["mi_over_entropy_a"],
        "purity_class_given_label": m["purity_a_given_b"],
        "nmi": m["nmi"],
        "mutual_information": m["mutual_information"],
    }
