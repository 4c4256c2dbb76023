"""`kmeans fit` and `kmeans report`: centroids from the features stage's sample, and label-quality figures.

Fit reads only `WORKDIR/features/FEATURES/sample.npy`, the stratified uniform frame sample the features
stage kept (at most its `--sample-frames` frames), never the feature store itself; `--sample-frames`
here takes a uniform subset of it (seeded). Outputs, written atomically:

    WORKDIR/kmeans/NAME/centroids.npy   float32 (k, dim)
    WORKDIR/kmeans/NAME/fit.json        fit config, inertia, timings, sample size, centroids sha256
    WORKDIR/kmeans/last.json            which fit was last: what `tokenize --teacher kmeans` uses by default

Report reads label sets one file at a time (bounded memory): cluster usage per codebook row, and against
every other label set the mutual information and purities on the files both labelled (fairseq's
measure_teacher_quality figures, codebook 0 of multi-codebook teachers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from manifests.io import iter_records
from manifests.records import LabelRecord
from mert_pipeline.fs import atomic_path, atomic_write_json, sha256_file
from mert_pipeline.kmeans import JointCounts, fit_kmeans, usage_from_counts
from stages.features import DESCRIPTION, SAMPLE

LAST = "last.json"
REPORT = "report.json"


class KMeansInputError(ValueError):
    """A fit or report cannot start: a missing or too small input, named in one line."""


def kmeans_dir(workdir: Path) -> Path:
    return workdir / "kmeans"


def fit_from_features(
    workdir: Path,
    features: str = "mfcc",
    k: int = 500,
    sample_frames: int | None = None,
    seed: int = 0,
    backend: Literal["faiss", "sklearn"] = "faiss",
    name: str | None = None,
) -> dict[str, Any]:
    """Fit k centroids to the features stage's sample and record them as the last fit; return fit.json."""
    source = workdir / "features" / features
    try:
        described = json.loads((source / DESCRIPTION).read_text())
        sample = np.load(source / SAMPLE, mmap_mode="r")
    except FileNotFoundError as exc:
        raise KMeansInputError(
            f"{source / SAMPLE} not found: run `mert-pipe features {workdir} --kind {features}` first"
        ) from exc
    available = len(sample)
    rng = np.random.default_rng(seed)
    if sample_frames is not None and sample_frames < available:
        rows = np.sort(rng.choice(available, size=sample_frames, replace=False))
        x = np.ascontiguousarray(sample[rows], dtype=np.float32)
    else:
        x = np.ascontiguousarray(sample, dtype=np.float32)
    if len(x) < k:
        raise KMeansInputError(
            f"the sample holds {len(x)} frames, fewer than k={k}: lower --k or rerun `mert-pipe features` "
            "with a larger --sample-frames (or on more audio)"
        )
    result = fit_kmeans(x, k, seed=seed, backend=backend)
    name = name or f"{features}_k{k}"
    out = kmeans_dir(workdir) / name
    with atomic_path(out / "centroids.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, result.centroids, allow_pickle=False)
    fit = {
        "name": name,
        "centroids": str(out / "centroids.npy"),
        "centroids_sha256": sha256_file(out / "centroids.npy"),
        "k": k,
        "dim": int(x.shape[1]),
        "seed": seed,
        "backend": backend,
        "features": features,
        "features_config_hash": described["config_hash"],
        "features_extractor": described["config"],  # what `tokenize --teacher kmeans` must recompute
        "features_checkpoint": described.get("checkpoint"),  # model features: the checkpoint's path
        "sample_frames": len(x),
        "sample_available": available,
        "sample_requested": sample_frames,
        "inertia": result.inertia,
        "inertia_per_frame": result.inertia / len(x),
        "fit_seconds": result.seconds,
        "fit_config": result.config,
    }
    atomic_write_json(out / "fit.json", fit)
    atomic_write_json(kmeans_dir(workdir) / LAST, {"name": name, "centroids": fit["centroids"]})
    return fit


def last_centroids(workdir: Path) -> Path:
    """The centroids `kmeans fit` wrote last in WORKDIR."""
    try:
        last = json.loads((kmeans_dir(workdir) / LAST).read_text())
    except FileNotFoundError as exc:
        raise KMeansInputError(
            f"no centroids fitted in {workdir}: run `mert-pipe kmeans fit {workdir}` or pass --centroids"
        ) from exc
    return Path(last["centroids"])


def label_sets(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every finished label set in WORKDIR/labels: name -> its teacher.json."""
    found = {}
    root = workdir / "labels"
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if (directory / "labels.parquet").exists() and (directory / "teacher.json").exists():
            found[directory.name] = json.loads((directory / "teacher.json").read_text())
    return found


def label_report(workdir: Path, teacher: str | None = None) -> dict[str, Any]:
    """Usage and agreement figures of label set `teacher` (default: every k-means label set, or every
    label set when none is k-means); each report also goes to WORKDIR/labels/NAME/report.json."""
    sets = label_sets(workdir)
    if not sets:
        raise KMeansInputError(f"no label sets in {workdir / 'labels'}: run `mert-pipe tokenize` first")
    if teacher is not None:
        if teacher not in sets:
            raise KMeansInputError(f"no label set {teacher!r} in {workdir / 'labels'} ({', '.join(sets)})")
        targets = [teacher]
    else:
        targets = [name for name, facts in sets.items() if facts.get("kind") == "kmeans"] or list(sets)
    reports = {name: _report_one(workdir, name, sets) for name in targets}
    for name, report in reports.items():
        atomic_write_json(workdir / "labels" / name / REPORT, report)
    return reports


def _relpaths(workdir: Path, name: str) -> dict[str, str]:
    manifest = workdir / "labels" / name / "labels.parquet"
    return {r.id: r.relpath for r in iter_records(manifest, record_type=LabelRecord)}


def _report_one(workdir: Path, name: str, sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    facts = sets[name]
    k, n_q = int(facts["num_classes"]), int(facts["n_q"])
    mine = _relpaths(workdir, name)
    if not mine:
        raise KMeansInputError(f"label set {name!r} holds no labels (see its rejects.jsonl)")
    others = {other: _relpaths(workdir, other) for other in sets if other != name}
    joints = {other: JointCounts(k, int(sets[other]["num_classes"])) for other in others}
    usage = np.zeros((n_q, k), dtype=np.int64)
    for file_id in sorted(mine):
        labels = np.load(workdir / "labels" / name / mine[file_id]).astype(np.int64)
        for row in range(n_q):
            usage[row] += np.bincount(labels[row], minlength=k)
        for other, relpaths in others.items():
            if file_id in relpaths:
                theirs = np.load(workdir / "labels" / other / relpaths[file_id])
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
