"""MARBLE-style linear probe: mean-pooled embeddings of every layer, one logistic regression per layer.

Data: a CSV (`path,label` columns, paths relative to the CSV), a folder with one sub-folder per class, or
a built-in synthetic task (`builtin:pitch`: 12 pitch classes over 3 octaves, each note with a random
timbre; `builtin:timbre`: 4 harmonic recipes at random pitches), made here so the demo needs no data.
The split is stratified and seeded; features are standardised on the training part only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mert_pipeline.audio import ProbeFailure
from mert_pipeline.embed import (
    RATE,
    Embedder,
    PooledStates,
    embed_array,
    embed_stream,
    list_inputs,
    read_audio,
)

BUILTIN = ("pitch", "timbre")


@dataclass
class ProbeData:
    name: str
    audio: list[np.ndarray]
    labels: list[str]
    rejects: list[dict[str, str]]


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
    """`builtin:NAME`, a CSV of path,label or a folder of class folders; unreadable files become rejects."""
    if spec.startswith("builtin:"):
        return builtin_task(spec.split(":", 1)[1], per_class=per_class, seed=seed)
    source = Path(spec)
    if source.suffix.lower() == ".csv" and source.is_file():
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{source} needs a header with path and label columns")
        items = [(source.parent / row["path"], row["label"]) for row in rows]
    elif source.is_dir():
        classes = sorted(p for p in source.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise ValueError(f"{source} needs at least two class folders")
        items = [(path, c.name) for c in classes for _, path in list_inputs(c)]
    else:
        raise ValueError(f"--data must be builtin:pitch, builtin:timbre, a .csv or a folder, not {spec!r}")
    data = ProbeData(str(source), [], [], [])
    for path, label in items:
        try:
            data.audio.append(read_audio(path))
            data.labels.append(label)
        except ProbeFailure as exc:
            data.rejects.append({"path": str(path), "reason": exc.reason, "detail": exc.detail})
        except (OSError, RuntimeError, ValueError) as exc:
            data.rejects.append({"path": str(path), "reason": "decode_error", "detail": str(exc)})
    return data


LONG_CLIP = 30 * RATE  # longer clips are embedded in chunks of this many samples


def pooled_features(embedder: Embedder, audio: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """(clips, L + 1, D): each clip's frame-mean per layer; equal-length clips are batched together."""
    out: list[np.ndarray | None] = [None] * len(audio)
    by_length: dict[int, list[int]] = {}
    for i, clip in enumerate(audio):
        by_length.setdefault(len(clip), []).append(i)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch):
            group = indices[start : start + batch]
            if 400 <= length <= LONG_CLIP:
                states = embedder.hidden_states(torch.from_numpy(np.stack([audio[i] for i in group])))
                for j, i in enumerate(group):
                    out[i] = states[:, j].mean(1).numpy()
            elif length < 400:
                for i in group:
                    out[i] = embed_array(embedder, audio[i], None, "mean", 400, 1)
            else:  # a long clip: in 30 s chunks, so the model's memory does not grow with its length
                for i in group:
                    sink = PooledStates("mean", Path("."))
                    embed_stream(embedder, [audio[i]], None, LONG_CLIP, 1, sink)
                    out[i] = sink.mean()
    return np.stack(out)  # type: ignore[arg-type]


def linear_probe(
    features: np.ndarray, labels: list[str], test_fraction: float = 0.25, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of a logistic regression per layer on a stratified held-out split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError("the probe needs at least two classes")
    y = np.array([names.index(label) for label in labels])
    train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    accuracies = []
    for layer in range(features.shape[1]):
        scaler = StandardScaler().fit(features[train, layer])
        clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
        clf.fit(scaler.transform(features[train, layer]), y[train])
        accuracies.append(float((clf.predict(scaler.transform(features[test, layer])) == y[test]).mean()))
    best = int(np.argmax(accuracies))
    counts = np.bincount(y[test], minlength=len(names))
    return {
        "classes": names,
        "train": len(train),
        "test": len(test),
        "accuracy": accuracies,
        "best_layer": best,
        "best_accuracy": accuracies[best],
        "chance": 1.0 / len(names),
        "majority": float(counts.max() / counts.sum()),
    }


def plot_accuracy(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy by layer, one line per model (e.g. trained vs random init), chance as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from mert_pipeline.fs import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    chance = 0.0
    for name, result in results.items():
        acc = result["accuracy"]
        ax.plot(range(len(acc)), acc, marker="o", label=f"{name} (best {result['best_accuracy']:.2f})")
        chance = result["chance"]
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("layer (0 = input to layer 1)")
    ax.set_ylabel("held-out accuracy")
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
    per_class: int = 16,
    test_fraction: float = 0.25,
    seed: int = 0,
    device: str = "auto",
    on_status: Any = None,
) -> dict[str, Any]:
    """The probe of `mert-pipe probe`: every layer of the model (and of its random init with `baseline`)
    on `data`, written to OUT/probe.json and OUT/probe.png; returns probe.json's content. A dataset or
    checkpoint that cannot be used is a ValueError in one line."""
    import contextlib
    import json
    import time

    from mert_pipeline.embed import load_embedder
    from mert_pipeline.fs import atomic_write_text, ensure_writable_dir
    from mert_pipeline.hf_export import CheckpointError

    status = on_status or (lambda text: contextlib.nullcontext())
    try:
        dataset = load_probe_data(data, per_class=per_class, seed=seed)
    except OSError as exc:
        raise ValueError(str(exc)) from exc
    if len(set(dataset.labels)) < 2:
        raise ValueError(f"{data}: fewer than two classes with readable audio")
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
    results = {}
    for name, embedder in models.items():
        with status(f"probe: embedding {len(dataset.audio)} clips ({name})"):
            features = pooled_features(embedder, dataset.audio)
        results[name] = linear_probe(features, dataset.labels, test_fraction=test_fraction, seed=seed)
    first = next(iter(results.values()))
    title = f"linear probe: {dataset.name}, {first['test']} held-out of {len(dataset.audio)} clips"
    plot_accuracy(results, out / "probe.png", title)
    summary = {
        "checkpoint": str(checkpoint),
        "data": dataset.name,
        "clips": len(dataset.audio),
        "rejects": dataset.rejects,
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_text(out / "probe.json", json.dumps(summary, indent=1) + "\n")
    return summary
