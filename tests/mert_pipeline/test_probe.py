"""Linear probe: separable data reaches high accuracy, random labels stay near chance, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.probe import builtin_task, linear_probe
from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint


def test_separable_features_are_learned_and_random_labels_are_not() -> None:
    rng = np.random.default_rng(0)
    classes, per_class, dim = 4, 60, 16
    centres = rng.standard_normal((classes, dim)) * 3
    labels = [f"c{c}" for c in range(classes) for _ in range(per_class)]
    # layer 0: pure noise; layer 1: class centres plus noise
    noise = rng.standard_normal((classes * per_class, dim))
    signal = np.repeat(centres, per_class, axis=0) + rng.standard_normal((classes * per_class, dim))
    features = np.stack([noise, signal], axis=1)
    result = linear_probe(features, labels, seed=0)
    assert result["best_layer"] == 1 and result["accuracy"][1] >= 0.95
    assert result["chance"] == 0.25 and result["test"] == 60
    shuffled = list(np.random.default_rng(1).permutation(labels))
    chance = linear_probe(features, shuffled, seed=0)
    assert max(chance["accuracy"]) < 0.45  # chance 0.25; 60 test items: a 3-sigma band is about 0.17


def test_builtin_tasks_are_deterministic_and_balanced() -> None:
    a, b = builtin_task("pitch", per_class=2, seed=3), builtin_task("pitch", per_class=2, seed=3)
    assert len(a.audio) == 24 and sorted(set(a.labels))[:2] == ["A", "A#"]
    assert all(np.array_equal(x, y) for x, y in zip(a.audio, b.audio, strict=True))
    assert all(len(x) == 24000 and np.abs(x).max() < 1 for x in a.audio)
    assert {a.labels.count(label) for label in set(a.labels)} == {2}


def test_probe_command_on_class_folders(tmp_path: Path) -> None:
    """Low sines vs bright noise: even a random-init model's pooled embeddings separate them."""
    rng = np.random.default_rng(0)
    t = np.arange(12000) / 24000
    for i in range(12):
        (tmp_path / "data" / "low").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "bright").mkdir(parents=True, exist_ok=True)
        low = 0.3 * np.sin(2 * np.pi * rng.uniform(80, 160) * t)
        sf.write(tmp_path / "data" / "low" / f"{i}.wav", low, 24000)
        sf.write(tmp_path / "data" / "bright" / f"{i}.flac", 0.2 * rng.standard_normal(len(t)), 24000)
    (tmp_path / "data" / "low" / "broken.wav").write_bytes(b"RIFF....not audio")
    write_tiny_checkpoint(tmp_path / "run", pre_ln=False)
    out = tmp_path / "probe"
    args = [
        "probe",
        "--checkpoint",
        str(tmp_path / "run"),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "probe.json").read_text())
    assert summary["clips"] == 24 and len(summary["rejects"]) == 1
    trained = summary["results"]["trained"]
    assert len(trained["accuracy"]) == 3 and trained["best_accuracy"] >= 0.9
    assert "random init" in summary["results"]
    assert (out / "probe.png").read_bytes().startswith(b"\x89PNG") and (
        out / "probe.png"
    ).stat().st_size > 5000
    bad = CliRunner().invoke(app, ["probe", "--checkpoint", str(tmp_path / "run"), "--data", "builtin:nope"])
    assert bad.exit_code == 2 and "error:" in bad.output
