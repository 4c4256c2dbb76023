"""MARBLE-style linear probe: pooled embeddings of every layer (the frame mean, or mean and std), one
logistic regression per layer.

Data: a CSV (`path,label` columns, paths relative to the CSV, and an optional `group` column: the recording,
the instrument... a clip comes from), a folder with one sub-folder per class, or a built-in synthetic task
(`builtin:pitch`: 12 pitch classes over 3 octaves, each note with a random timbre; `builtin:timbre`: 4
harmonic recipes at random pitches), made here so the demo needs no data.
The accuracy is the mean over k stratified, seeded folds (every clip is held out once); with groups, no group
has clips on both sides of a fold. Features are standardised on each fold's training part only. Beside the
model, a random init of it and an MFCC baseline (the k-means teacher's MFCC, mean and std over frames) go
through the same classifier and folds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mert_pipeline.audio import ProbeFailure
from mert_pipeline.embed import (
    MIN_SAMPLES,
    RATE,
    Embedder,
    PooledStates,
    embed_array,
    embed_stream,
    list_inputs,
    read_audio,
    stream_audio,
)

BUILTIN = ("pitch", "timbre")


Clip = np.ndarray | Path  # in memory (the built-in tasks), or a file decoded when its turn comes


@dataclass
class ProbeData:
    """The clips of a probe task: synthesized ones in memory; files as their paths and 24 kHz lengths
    (checked to decode when listed), read again batch by batch, so a dataset's audio is never all held."""

    name: str
    clips: list[Clip]
    labels: list[str]
    rejects: list[dict[str, str]]
    groups: list[str] | None = None  # per clip, from a CSV's `group` column; None: every clip on its own
    lengths: list[int] = field(default_factory=list)  # samples at 24 kHz, per clip

    def __post_init__(self) -> None:
        if not self.lengths:
            self.lengths = [len(clip) for clip in self.clips if isinstance(clip, np.ndarray)]


def _note(rng: np.random.Generator, freq: float, harmonics: np.ndarray, seconds: float) -> np.ndarray:
    """One note: harmonics with the given amplitudes, an attack/decay envelope, a little noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = rng.uniform(0, 2 * math.pi, len(harmonics))
    wave = sum(
        a * np.sin(2 * math.pi * freq * (h + 1) * t + p)
        for h, (a, p) in enumerate(zip(harmonics, phase, strict=True))
    )
    envelope = np.minimum(1.0, t / 0.02) * np.exp(-t * rng.uniform(0.5, 2.0))
    wave = 0.3 * wave / np.abs(wave).max() * envelope + 0.003 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


TIMBRES = np.array(
    [
        [1, 0, 0, 0, 0, 0],
        [1, 0.5, 0.33, 0.25, 0.2, 0.17],
        [1, 0, 0.33, 0, 0.2, 0],
        [0.3, 1, 0.2, 0.6, 0.1, 0.4],
    ]
)


def builtin_task(name: str, per_class: int = 16, seconds: float = 1.0, seed: int = 0) -> ProbeData:
    """Synthesized notes: `pitch` labels the pitch class (C..B; octave and timbre random), `timbre` the
    harmonic recipe (pitch random)."""
    if name not in BUILTIN:
        raise ValueError(f"built-in probe tasks: {', '.join('builtin:' + b for b in BUILTIN)}; not {name!r}")
    rng = np.random.default_rng(seed)
    classes = 12 if name == "pitch" else len(TIMBRES)
    audio, labels = [], []
    for _ in range(per_class):
        for c in range(classes):
            if name == "pitch":
                midi, timbre = 48 + c + 12 * int(rng.integers(3)), TIMBRES[rng.integers(len(TIMBRES))]
                label = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"][c]
            else:
                midi, timbre, label = int(rng.integers(45, 80)), TIMBRES[c], f"timbre{c}"
            harmonics = timbre * rng.uniform(0.8, 1.2, len(timbre))
            audio.append(_note(rng, 440.0 * 2 ** ((midi - 69) / 12), harmonics, seconds))
            labels.append(label)
    return ProbeData(f"builtin:{name}", audio, labels, [])


def load_probe_data(spec: str, per_class: int = 16, seed: int = 0) -> ProbeData:
    """`builtin:NAME`, a CSV of path,label[,group] or a folder of class folders; unreadable files become
    rejects. A CSV's empty `group` cell makes that clip a group of its own."""
    if spec.startswith("builtin:"):
        return builtin_task(spec.split(":", 1)[1], per_class=per_class, seed=seed)
    source = Path(spec)
    if source.suffix.lower() == ".csv" and source.is_file():
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{source} needs a header with path and label columns")
        grouped = "group" in rows[0]
        items = [
            (
                source.parent / row["path"],
                row["label"],
                (row["group"] or f"clip:{row['path']}") if grouped else "",
            )
            for row in rows
        ]
    elif source.is_dir():
        classes = sorted(p for p in source.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise ValueError(f"{source} needs at least two class folders")
        grouped = False
        items = [(path, c.name, "") for c in classes for _, path in list_inputs(c)]
    else:
        raise ValueError(f"--data must be builtin:pitch, builtin:timbre, a .csv or a folder, not {spec!r}")
    data = ProbeData(str(source), [], [], [], [] if grouped else None)
    for path, label, group in items:
        try:
            length = sum(len(block) for block in stream_audio(path))  # decodes to the end: no surprise later
            data.clips.append(Path(path))
            data.lengths.append(length)
            data.labels.append(label)
            if data.groups is not None:
                data.groups.append(group)
        except ProbeFailure as exc:
            data.rejects.append({"path": str(path), "reason": exc.reason, "detail": exc.detail})
        except (OSError, RuntimeError, ValueError) as exc:
            data.rejects.append({"path": str(path), "reason": "decode_error", "detail": str(exc)})
    return data


LONG_CLIP = 30 * RATE  # longer clips are embedded in chunks of this many samples


POOLS = ("mean", "meanstd")  # per layer: the frame mean, or the frame mean and std side by side


def _pool(states: torch.Tensor, pool: str) -> np.ndarray:
    """(L + 1, T, D) states of one clip -> (L + 1, D) frame means, or (L + 1, 2D) means and stds."""
    mean = states.mean(1)
    if pool == "mean":
        return mean.numpy()
    return torch.cat([mean, states.std(1, correction=0)], dim=-1).numpy()


def _pool_batch(embedder: Embedder, audio: list[np.ndarray], pool: str) -> list[np.ndarray]:
    """Pooled states of clips of one length, at most LONG_CLIP samples, in one forward pass (a clip
    shorter than a frame is padded to one, as `embed_array` pads it)."""
    if len(audio[0]) >= MIN_SAMPLES:
        states = embedder.hidden_states(torch.from_numpy(np.stack(audio)))
        return [_pool(states[:, j], pool) for j in range(len(audio))]
    return [
        _pool(torch.from_numpy(embed_array(embedder, clip, None, "none", MIN_SAMPLES, 1)), pool)
        for clip in audio
    ]


def _pool_stream(embedder: Embedder, blocks: Any, pool: str) -> np.ndarray:
    """Pooled states of a long clip fed block by block in 30 s chunks: memory does not grow with it."""
    sink = PooledStates(pool, Path("."))  # "mean" or "meanstd"
    embed_stream(embedder, blocks, None, LONG_CLIP, 1, sink)
    return sink.mean() if pool == "mean" else np.concatenate([sink.mean(), sink.std()], -1)


def _mfcc_stream(blocks: Any) -> np.ndarray:
    """`mfcc_features` of one long clip, its frames' mean and std gathered block by block."""
    from mert_pipeline.teachers.features import MFCC, RunningStats

    extractor, stats = MFCC(), None
    for frames in extractor.stream(blocks):
        stats = stats or RunningStats(frames.shape[1])
        stats.update(frames)
    assert stats is not None  # a long clip has frames
    return np.concatenate([stats.mean, stats.std])[None, :]


def probe_features(
    models: dict[str, Embedder],
    clips: list[Clip],
    lengths: list[int],
    *,
    pool: str = "mean",
    mfcc: bool = False,
    batch: int = 16,
) -> dict[str, np.ndarray]:
    """Every model's features (clips, L + 1, D or 2D with pool "meanstd") and, with `mfcc`, the MFCC
    baseline's (clips, 1, 78), each clip read once for all of them. Clips of one length go through a model
    together, `batch` at a time; a clip longer than LONG_CLIP is streamed in 30 s chunks. Memory holds one
    batch of clips or one block of a long one, whatever the dataset's size or a clip's length."""
    if pool not in POOLS:
        raise ValueError(f"pool is one of {', '.join(POOLS)}, not {pool!r}")
    names = [*models, *([MFCC_NAME] if mfcc else [])]
    out: dict[str, list[np.ndarray | None]] = {name: [None] * len(clips) for name in names}
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    for length, indices in sorted(by_length.items()):
        if length > LONG_CLIP:
            for i in indices:
                for name, embedder in models.items():
                    out[name][i] = _pool_stream(embedder, clip_blocks(clips[i]), pool)
                if mfcc:
                    out[MFCC_NAME][i] = _mfcc_stream(clip_blocks(clips[i]))
            continue
        for start in range(0, len(indices), batch):
            group = indices[start : start + batch]
            audio = [read_audio(c) if isinstance(c, Path) else c for c in (clips[i] for i in group)]
            for name, embedder in models.items():
                for i, pooled in zip(group, _pool_batch(embedder, audio, pool), strict=True):
                    out[name][i] = pooled
            if mfcc:
                for i, pooled in zip(group, mfcc_features(audio), strict=True):
                    out[MFCC_NAME][i] = pooled
    return {name: np.stack(features) for name, features in out.items()}  # type: ignore[arg-type]


def clip_blocks(clip: Clip) -> Any:
    """A clip as 24 kHz mono blocks: the in-memory array as one block, a file streamed (`stream_audio`)."""
    return stream_audio(clip) if isinstance(clip, Path) else [clip]


def pooled_features(
    embedder: Embedder, audio: list[np.ndarray], batch: int = 16, pool: str = "mean"
) -> np.ndarray:
    """(clips, L + 1, D), or (clips, L + 1, 2D) with pool "meanstd": each clip's frame mean per layer (and
    its std over frames, as the MFCC baseline has), of clips in memory (`probe_features` of one model)."""
    lengths = [len(clip) for clip in audio]
    return probe_features({"model": embedder}, list(audio), lengths, pool=pool, batch=batch)["model"]


def mfcc_features(audio: list[np.ndarray]) -> np.ndarray:
    """(clips, 1, 78): the MFCC baseline as one "layer": per clip, the mean and the std over frames of the
    k-means teacher's features (`teachers.features.MFCC`: MFCC-13 + deltas + delta-deltas at 75 Hz). Clips
    shorter than one MFCC window (600 samples) are zero-padded to one, as the embedder pads short clips."""
    from mert_pipeline.teachers.features import MFCC

    extractor = MFCC()
    padded = [np.pad(clip, (0, max(0, extractor.win - len(clip)))) for clip in audio]
    frames = extractor.batch(padded)
    pooled = [np.concatenate([f.mean(0, dtype=np.float64), f.std(0, dtype=np.float64)]) for f in frames]
    return np.stack(pooled)[:, None, :]


Split = tuple[np.ndarray, np.ndarray]  # (train indices, test indices) of one fold


def probe_folds(
    labels: list[str], groups: list[str] | None = None, folds: int = 4, seed: int = 0
) -> list[Split]:
    """The probe's k (train, test) splits: StratifiedKFold, or StratifiedGroupKFold when `groups` is given
    (no group on both sides of a fold); shuffled with `seed`; every clip is in exactly one test part. k is
    `folds`, reduced to the number of groups (clips, without groups) of the class with the fewest; a
    ValueError in one line when that is under 2."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if folds < 2:
        raise ValueError(f"the probe needs at least 2 folds, not {folds}")
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError("the probe needs at least two classes")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} clips")
    y = np.array([names.index(label) for label in labels])
    units: dict[str, set[Any]] = {name: set() for name in names}  # each class's groups (or clips)
    for i, label in enumerate(labels):
        units[label].add(i if groups is None else groups[i])
    fewest = min(names, key=lambda name: (len(units[name]), name))
    if len(units[fewest]) < 2:
        what = "clip" if groups is None else "group"
        raise ValueError(
            f"class {fewest!r} has {len(units[fewest])} {what}; the probe needs at least 2 {what}s per class "
            "to hold some out"
        )
    k = min(folds, len(units[fewest]))
    index = np.arange(len(y))
    if groups is None:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(index, y)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(index, y, groups=np.array(groups))
    out = [(train, test) for train, test in splits]
    for n, (train, test) in enumerate(out, 1):
        if len(test) == 0 or len(set(y[train])) < 2:  # StratifiedGroupKFold is greedy: check, do not assume
            raise ValueError(f"fold {n} of {k} holds out nothing or trains on one class; try fewer --folds")
    return out


def linear_probe(
    features: np.ndarray,
    labels: list[str],
    groups: list[str] | None = None,
    folds: int = 4,
    seed: int = 0,
    *,
    splits: list[Split] | None = None,
) -> dict[str, Any]:
    """Accuracy of a logistic regression per layer of `features` (clips, layers, dim): the mean over the
    folds of `probe_folds(labels, groups, folds, seed)` (or the given `splits`), each fold standardising on
    its training part. `train` and `test` are totals over the folds (`test` counts every clip once)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError("the probe needs at least two classes")
    if splits is None:
        splits = probe_folds(labels, groups, folds, seed)
    y = np.array([names.index(label) for label in labels])
    by_layer = []
    for layer in range(features.shape[1]):
        x = features[:, layer]
        fold_accuracy = []
        for train, test in splits:
            scaler = StandardScaler().fit(x[train])
            clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
            clf.fit(scaler.transform(x[train]), y[train])
            fold_accuracy.append(float((clf.predict(scaler.transform(x[test])) == y[test]).mean()))
        by_layer.append(fold_accuracy)
    accuracies = [float(np.mean(fold)) for fold in by_layer]
    best = int(np.argmax(accuracies))
    counts = np.bincount(y, minlength=len(names))
    return {
        "classes": names,
        "folds": len(splits),
        "train": int(sum(len(train) for train, _ in splits)),
        "test": int(sum(len(test) for _, test in splits)),
        "accuracy": accuracies,
        "fold_accuracy": by_layer,
        "best_layer": best,
        "best_accuracy": accuracies[best],
        "chance": 1.0 / len(names),
        "majority": float(counts.max() / counts.sum()),
    }


MFCC_NAME = "MFCC"  # the MFCC baseline's key in probe.json's results


def plot_accuracy(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy by layer, one line per model (e.g. trained vs random init); the MFCC baseline (one "layer")
    as a dotted horizontal line, chance as a dashed one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from mert_pipeline.fs import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    chance = 0.0
    for name, result in results.items():
        acc = result["accuracy"]
        if name == MFCC_NAME:
            ax.axhline(acc[0], color="tab:green", linestyle=":", label=f"MFCC mean+std ({acc[0]:.2f})")
        else:
            ax.plot(range(len(acc)), acc, marker="o", label=f"{name} (best {result['best_accuracy']:.2f})")
        chance = result["chance"]
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer (0 = input to layer 1)")
    folds = next(iter(results.values())).get("folds")
    ax.set_ylabel(f"held-out accuracy ({folds}-fold mean)" if folds else "held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_probe(
    checkpoint: Path,
    data: str = "builtin:pitch",
    out: Path = Path("probe"),
    *,
    baseline: bool = True,
    mfcc: bool = True,
    folds: int = 4,
    pool: str = "mean",
    per_class: int = 16,
    seed: int = 0,
    device: str = "auto",
    on_status: Any = None,
) -> dict[str, Any]:
    """The probe of `mert-pipe probe`: every layer of the model, of its random init and the MFCC baseline
    (`baseline=False` skips both baselines, `mfcc=False` the MFCC one) on `data`, each layer pooled by `pool`
    ("mean", or "meanstd": the mean and std over frames, as the MFCC baseline is), over `folds` folds (fewer
    when a class has fewer groups or clips), written to OUT/probe.json and OUT/probe.png; returns
    probe.json's content. A dataset or checkpoint that cannot be used is a ValueError in one line."""
    import contextlib
    import json
    import time

    from mert_pipeline.embed import load_embedder
    from mert_pipeline.fs import atomic_write_text, ensure_writable_dir
    from mert_pipeline.hf_export import CheckpointError

    status = on_status or (lambda text: contextlib.nullcontext())
    if pool not in POOLS:
        raise ValueError(f"--pool is one of {', '.join(POOLS)}, not {pool!r}")
    try:
        dataset = load_probe_data(data, per_class=per_class, seed=seed)
    except OSError as exc:
        raise ValueError(str(exc)) from exc
    if len(set(dataset.labels)) < 2:
        raise ValueError(f"{data}: fewer than two classes with readable audio")
    splits = probe_folds(dataset.labels, dataset.groups, folds, seed)  # before the long part: bad groups fail
    inits = {"trained": False, "random init": True} if baseline else {"trained": False}
    try:
        models = {
            name: load_embedder(checkpoint, device, random_init=random_init, seed=seed)
            for name, random_init in inits.items()
        }
        ensure_writable_dir(out)  # once the models load, before the long part
    except (CheckpointError, OSError) as exc:
        raise ValueError(str(exc).splitlines()[0]) from exc
    start = time.perf_counter()
    what = " and ".join([*models, *(["MFCC"] if baseline and mfcc else [])])
    with status(f"probe: {len(dataset.clips)} clips through {what}"):  # once each, then every fold
        features = probe_features(models, dataset.clips, dataset.lengths, pool=pool, mfcc=baseline and mfcc)
    results = {
        name: linear_probe(f, dataset.labels, seed=seed, splits=splits) for name, f in features.items()
    }
    title = f"linear probe: {dataset.name}, {len(dataset.clips)} clips, {len(splits)} folds"
    plot_accuracy(results, out / "probe.png", title + ("" if dataset.groups is None else " by group"))
    summary = {
        "checkpoint": str(checkpoint),
        "data": dataset.name,
        "clips": len(dataset.clips),
        "groups": None if dataset.groups is None else len(set(dataset.groups)),
        "folds": len(splits),
        "folds_requested": folds,
        "pool": pool,
        "rejects": dataset.rejects,
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_text(out / "probe.json", json.dumps(summary, indent=1) + "\n")
    return summary
