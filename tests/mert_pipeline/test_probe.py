"""Linear probe: separable data reaches high accuracy, random labels stay near chance, groups never leak
across folds, the MFCC baseline works, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.probe import builtin_task, linear_probe, load_probe_data, mfcc_features, probe_folds
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
    assert result["chance"] == 0.25 and result["folds"] == 4
    assert (
        result["test"] == 240 and result["train"] == 3 * 240
    )  # totals over the folds: each clip held out once
    assert [len(fold) for fold in result["fold_accuracy"]] == [4, 4]
    assert result["accuracy"][1] == np.mean(result["fold_accuracy"][1])
    shuffled = list(np.random.default_rng(1).permutation(labels))
    chance = linear_probe(features, shuffled, seed=0)
    assert max(chance["accuracy"]) < 0.4  # chance 0.25; 240 test items: a 3-sigma band is about 0.08


def test_folds_never_split_a_group_and_hold_every_clip_out_once() -> None:
    rng = np.random.default_rng(0)
    groups = [f"rec{g}" for g in rng.integers(0, 30, 200)]
    labels = [f"c{rng.integers(3)}" for _ in groups]  # a recording may hold clips of several classes
    splits = probe_folds(labels, groups, folds=5, seed=1)
    assert len(splits) == 5
    held_out = np.concatenate([test for _, test in splits])
    assert sorted(held_out) == list(range(200))
    for train, test in splits:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        assert {labels[i] for i in train} == {"c0", "c1", "c2"}
    assert [t.tolist() for _, t in splits] == [t.tolist() for _, t in probe_folds(labels, groups, 5, seed=1)]


def test_folds_shrink_to_the_class_with_fewest_groups_and_fail_below_two() -> None:
    labels = ["a"] * 8 + ["b"] * 6
    groups = ["a1", "a1", "a2", "a2", "a3", "a3", "a4", "a5", "b1", "b1", "b2", "b2", "b3", "b3"]
    assert len(probe_folds(labels, groups, folds=4)) == 3  # b has 3 recordings
    assert len(probe_folds(labels, None, folds=4)) == 4  # without groups, 6 clips of b are enough
    assert len(probe_folds(labels[:10], None, folds=4)) == 2  # b: 2 clips
    with pytest.raises(ValueError, match="class 'b' has 1 group;") as error:
        probe_folds(labels, groups[:8] + ["b1"] * 6)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="class 'b' has 1 clip;"):
        probe_folds(labels[:9], None)


def test_a_csv_group_column_is_read_and_an_empty_cell_is_a_group_of_its_own(tmp_path: Path) -> None:
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(tmp_path / name, np.zeros(2400), 24000)
    (tmp_path / "g.csv").write_text(
        "path,label,group\na.wav,x,tape1\nmissing.wav,x,tape1\nb.wav,y,\nc.wav,y,tape1\n"
    )
    data = load_probe_data(str(tmp_path / "g.csv"))
    assert data.labels == ["x", "y", "y"] and data.groups == ["tape1", "clip:b.wav", "tape1"]
    assert len(data.rejects) == 1
    (tmp_path / "plain.csv").write_text("path,label\na.wav,x\nb.wav,y\n")
    assert load_probe_data(str(tmp_path / "plain.csv")).groups is None


def test_a_recording_artefact_leaks_without_groups_and_not_with_them() -> None:
    """Features that identify the recording (a random vector per group) and a label drawn per recording:
    clips of a training recording give the label of its held-out clips away unless the folds keep groups
    apart."""
    rng = np.random.default_rng(0)
    recordings, per_recording = 60, 5
    signature = rng.standard_normal((recordings, 256))
    label_of = rng.permutation(["a", "b"] * (recordings // 2))
    groups = [f"rec{g}" for g in range(recordings) for _ in range(per_recording)]
    labels = [str(label_of[g]) for g in range(recordings) for _ in range(per_recording)]
    features = np.repeat(signature, per_recording, axis=0) + 0.3 * rng.standard_normal((300, 256))
    leaky = linear_probe(features[:, None], labels)
    grouped = linear_probe(features[:, None], labels, groups)
    assert leaky["accuracy"][0] > 0.9
    assert abs(grouped["accuracy"][0] - 0.5) < 0.2  # 60 recordings: a 3-sigma band is about 0.19


def noise_band(rng: np.random.Generator, low: float, high: float, samples: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.fft.rfftfreq(samples, 1 / 24000)
    spectrum[(freqs < low) | (freqs > high)] = 0
    wave = np.fft.irfft(spectrum, samples)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def test_mfcc_baseline_separates_low_from_high_noise_and_takes_short_clips() -> None:
    rng = np.random.default_rng(0)
    low = [noise_band(rng, rng.uniform(100, 300), rng.uniform(600, 1000), 6000) for _ in range(12)]
    high = [noise_band(rng, rng.uniform(3000, 5000), rng.uniform(7000, 10000), 6000) for _ in range(12)]
    features = mfcc_features(low + high)
    assert features.shape == (24, 1, 78)
    gap = np.abs(features[:12, 0].mean(0) - features[12:, 0].mean(0)) / features[:, 0].std(0).clip(1e-6)
    assert gap.max() > 1.5  # the class means differ by more than the spread on some coefficient
    result = linear_probe(features, ["low"] * 12 + ["high"] * 12)
    assert result["accuracy"][0] > 0.8 and result["best_layer"] == 0
    short = mfcc_features([np.zeros(0, np.float32), np.ones(1, np.float32), low[0][:599], low[0][:600]])
    assert short.shape == (4, 1, 78) and np.isfinite(short).all()


def test_builtin_tasks_are_deterministic_and_balanced() -> None:
    a, b = builtin_task("pitch", per_class=2, seed=3), builtin_task("pitch", per_class=2, seed=3)
    assert len(a.clips) == 24 and sorted(set(a.labels))[:2] == ["A", "A#"] and a.lengths == [24000] * 24
    assert all(np.array_equal(x, y) for x, y in zip(a.clips, b.clips, strict=True))
    assert all(len(x) == 24000 and np.abs(x).max() < 1 for x in a.clips)
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
    assert list(summary["results"]) == ["trained", "random init", "MFCC"]
    mfcc = summary["results"]["MFCC"]
    assert len(mfcc["accuracy"]) == 1 and mfcc["best_layer"] == 0 and mfcc["best_accuracy"] >= 0.9
    assert summary["folds"] == 4 and summary["groups"] is None and len(mfcc["fold_accuracy"][0]) == 4
    shown = " ".join(result.output.split())
    assert "MFCC best layer 0 accuracy" in shown and "trained +" in shown
    assert (out / "probe.png").read_bytes().startswith(b"\x89PNG") and (
        out / "probe.png"
    ).stat().st_size > 5000
    bad = CliRunner().invoke(app, ["probe", "--checkpoint", str(tmp_path / "run"), "--data", "builtin:nope"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_probe_command_keeps_recordings_apart(tmp_path: Path) -> None:
    """8 recordings, a tone each (the artefact), a label drawn per recording: MFCC learns the recording,
    so it predicts held-out clips of seen recordings, but with the group column held-out recordings stay
    near chance."""
    rng = np.random.default_rng(0)
    t = np.arange(6000) / 24000
    label_of = rng.permutation(["a", "b"] * 4)
    rows, audio = [], []
    (tmp_path / "clips").mkdir()
    for g, freq in enumerate(np.geomspace(200, 6000, 8)):
        for c in range(6):
            wave = 0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.3)) + 0.05 * rng.standard_normal(
                len(t)
            )
            sf.write(tmp_path / "clips" / f"{g}_{c}.wav", wave, 24000)
            audio.append(wave.astype(np.float32))
            rows.append(f"clips/{g}_{c}.wav,{label_of[g]},rec{g}")
    labels = [row.split(",")[1] for row in rows]
    assert linear_probe(mfcc_features(audio), labels)["accuracy"][0] > 0.85  # the leak, without groups
    (tmp_path / "grouped.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    (tmp_path / "plain.csv").write_text("path,label\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    write_tiny_checkpoint(tmp_path / "run", pre_ln=False)

    def probe(csv: str, *flags: str) -> tuple[dict, str]:
        out = tmp_path / "-".join(["out", csv, *flags])
        args = [
            "probe",
            "--checkpoint",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / csv),
            "--out",
            str(out),
        ]
        result = CliRunner().invoke(app, [*args, *flags])
        assert result.exit_code == 0, result.output
        return json.loads((out / "probe.json").read_text()), " ".join(result.output.split())

    summary, shown = probe("grouped.csv", "--folds", "6")
    assert summary["groups"] == 8 and summary["folds"] == 4 and summary["folds_requested"] == 6
    assert "--folds 6 reduced to 4" in shown  # each class has 4 recordings
    assert list(summary["results"]) == ["trained", "random init", "MFCC"]
    assert summary["results"]["MFCC"]["best_accuracy"] < 0.7  # 8 recordings: chance is a wide band
    assert all(r["best_accuracy"] < 0.75 for r in summary["results"].values())
    assert all(len(r["fold_accuracy"][0]) == 4 and r["test"] == 48 for r in summary["results"].values())
    assert list(probe("plain.csv", "--no-mfcc")[0]["results"]) == ["trained", "random init"]
    assert list(probe("plain.csv", "--no-baseline")[0]["results"]) == ["trained"]
    summary, _ = probe("plain.csv", "--no-mfcc", "--pool", "meanstd")
    assert summary["pool"] == "meanstd" and list(summary["results"]) == ["trained", "random init"]

    one = [r[: r.rindex(",")] + ",tape" if r.split(",")[1] == "b" else r for r in rows]  # b: one recording
    (tmp_path / "one.csv").write_text("path,label,group\n" + "\n".join(one) + "\n")
    bad = CliRunner().invoke(
        app, ["probe", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "one.csv")]
    )
    assert bad.exit_code == 2 and "class 'b' has 1 group;" in " ".join(bad.output.split())


def test_meanstd_pooling_is_each_layers_frame_mean_and_std_on_every_path(tmp_path: Path) -> None:
    """Batched clips, a clip shorter than a frame and one embedded in 30 s chunks all pool to the mean and
    the std over the clip's frames."""
    from mert_pipeline.embed import embed_array, load_embedder
    from mert_pipeline.probe import LONG_CLIP, pooled_features

    write_tiny_checkpoint(tmp_path / "run", pre_ln=False)
    embedder = load_embedder(tmp_path / "run", "cpu")
    rng = np.random.default_rng(0)
    lengths = [24000, 24000, 200, LONG_CLIP + 12000]
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    mean = pooled_features(embedder, clips, pool="mean")
    both = pooled_features(embedder, clips, pool="meanstd")
    dim = mean.shape[-1]
    assert both.shape == (4, mean.shape[1], 2 * dim)
    np.testing.assert_allclose(both[..., :dim], mean, rtol=1e-5, atol=1e-6)
    for i, clip in enumerate(clips):
        frames = embed_array(embedder, clip, None, "none", LONG_CLIP, 1)  # (L + 1, T, D)
        np.testing.assert_allclose(both[i, :, dim:], frames.std(1), rtol=1e-3, atol=1e-5)
        if frames.shape[1] > 1:
            assert both[i, :, dim:].min() > 0  # a real spread, not zeros
    with pytest.raises(ValueError, match="pool is one of mean, meanstd"):
        pooled_features(embedder, clips[:1], pool="max")
