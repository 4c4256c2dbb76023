"""HuBERT's next iteration: which layer of a trained model to cluster, chosen by measurement.

HuBERT's second iteration clusters a layer of the first student (layer 6 of 12 in the paper, chosen by the
phone purity of its clusters). Without phone labels, this measures what a music model's clusters should
hold: for every layer, k-means on a bounded sample of the corpus's own frames, then the label quality of
those clusters on held-out labelled clips, MI(cluster; class) / H(class) (the `kmeans report` figure).
The default clips are the probe's built-in tasks, `builtin:pitch` and `builtin:timbre` (synthesized, so
offline); a user passes their own (`--select-data labels.csv`, the probe's formats) to choose for what
they care about. The layer with the highest mean over the tasks wins; ties go to the shallower layer.

Bounded: at most `frames` frames of the train split (every file read for at most `seconds_per_file`),
every layer from one forward per window (`ModelFeatures.stream(every_layer=True)`, the windows and padding
of `features --kind model`), k = min(k, 128, frames / 20) per layer; the clips are streamed one at a time.
`pipeline.iterate` then runs the features (sample only), `kmeans fit`, `tokenize` and sidecar steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_pipeline.grid import FRAME_RATE, HOP
from mert_pipeline.manifests.io import iter_batches
from mert_pipeline.manifests.records import Reject

SELECT_DATA = ("builtin:pitch", "builtin:timbre")
SELECT_K = 128  # clusters per layer while choosing: enough to tell layers apart, cheap to fit
MIN_POINTS_PER_CLUSTER = 20


@dataclass
class LayerChoice:
    """Every layer's label quality per task (MI / H(class)), their mean, and the layer chosen."""

    layer: int
    scores: dict[int, dict[str, float]]
    k: int
    frames: int
    files: int
    data: list[str]
    seconds: float
    mean: dict[int, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "how": "max over layers of mean MI(cluster; class) / H(class) on held-out labelled clips",
            "data": self.data,
            "k": self.k,
            "frames": self.frames,
            "files": self.files,
            "seconds": round(self.seconds, 1),
            "per_layer": {str(layer): {"mean": self.mean[layer], **s} for layer, s in self.scores.items()},
        }


def corpus_frames(
    extractor: Any, manifest: Path, frames: int, seconds_per_file: float, seed: int
) -> tuple[np.ndarray, int]:
    """(L + 1, n, D) frames of every layer, n <= `frames`, from the train split's files in a seeded order,
    each read for at most `seconds_per_file`; and how many files gave frames."""
    from mert_pipeline.teachers import FileToLabel, read_blocks

    rows = [
        (row["id"], row["path"], row["num_samples"])
        for batch in iter_batches(manifest, columns=["id", "path", "num_samples", "split"])
        for row in batch.to_pylist()
        if row["split"] == "train"
    ]
    rows.sort()
    order = np.random.default_rng(seed).permutation(len(rows))
    per_file = max(1, int(seconds_per_file * FRAME_RATE))
    kept: list[np.ndarray] = []
    total = files = 0
    for index in order:
        if total >= frames:
            break
        failures: dict[str, Reject] = {}
        item = FileToLabel(*rows[index])
        taken = 0
        for block in extractor.stream(_head(read_blocks(item, failures), per_file), every_layer=True):
            block = block[:, : min(per_file - taken, frames - total)]
            kept.append(block)
            taken += block.shape[1]
            total += block.shape[1]
            if taken >= per_file or total >= frames:
                break
        files += taken > 0 and item.id not in failures
    if not kept:
        raise ValueError(f"no train audio in {manifest} to choose a layer on")
    return np.concatenate(kept, axis=1), files


def _head(blocks: Any, frames: int) -> Any:
    """The first `frames` hops of a file's blocks (plus one hop of look-ahead), then stop reading."""
    wanted, seen = frames * HOP + HOP, 0
    for block in blocks:
        yield block[: wanted - seen]
        seen += len(block)
        if seen >= wanted:
            return


def label_quality(
    extractor: Any, centroids: list[np.ndarray], data: str, per_class: int, seed: int
) -> list[float]:
    """MI(cluster; class) / H(class) of each layer's clusters over the frames of `data`'s clips."""
    from mert_pipeline.probe import clip_blocks, load_probe_data
    from mert_pipeline.teachers.kmeans import JointCounts, assign

    dataset = load_probe_data(data, per_class=per_class, seed=seed)
    classes = sorted(set(dataset.labels))
    if len(classes) < 2:
        raise ValueError(f"{data}: fewer than two classes with readable audio")
    counts = [JointCounts(len(classes), len(c)) for c in centroids]
    for clip, label in zip(dataset.clips, dataset.labels, strict=True):
        for states in extractor.stream(clip_blocks(clip), every_layer=True):
            truth = np.full(states.shape[1], classes.index(label))
            for layer, layer_centroids in enumerate(centroids):
                counts[layer].update(truth, assign(states[layer], layer_centroids))
    return [round(c.metrics()["mi_over_entropy_a"], 4) for c in counts]


def choose_layer(
    extractor: Any,
    manifest: Path,
    *,
    k: int,
    data: tuple[str, ...] | list[str] = SELECT_DATA,
    frames: int = 20_000,
    seconds_per_file: float = 10.0,
    per_class: int = 16,
    seed: int = 0,
    on_status: Any = None,
) -> LayerChoice:
    """The layer whose clusters hold the most about `data`'s classes (module docstring)."""
    from mert_pipeline.teachers.kmeans import fit_kmeans

    status = on_status or (lambda text: None)
    start = time.perf_counter()
    status(f"choosing a layer: every layer's frames of up to {frames} train frames")
    x, files = corpus_frames(extractor, manifest, frames, seconds_per_file, seed)
    k_select = max(2, min(k, SELECT_K, x.shape[1] // MIN_POINTS_PER_CLUSTER))
    centroids = []
    for layer in range(len(x)):
        status(f"choosing a layer: k-means k={k_select} on layer {layer} of {len(x) - 1}")
        centroids.append(fit_kmeans(np.ascontiguousarray(x[layer]), k_select, seed=seed).centroids)
    scores: dict[int, dict[str, float]] = {layer: {} for layer in range(len(x))}
    for spec in data:
        status(f"choosing a layer: label quality on {spec}")
        for layer, value in enumerate(label_quality(extractor, centroids, spec, per_class, seed)):
            scores[layer][spec] = value
    mean = {layer: round(float(np.mean(list(s.values()))), 4) for layer, s in scores.items()}
    best = max(mean, key=lambda layer: (mean[layer], -layer))
    return LayerChoice(
        best, scores, k_select, int(x.shape[1]), files, list(data), time.perf_counter() - start, mean
    )
