"""Why the small model misses issue 18's goal: what the teachers hold, and whether the CQT can be learned.

Run from the repository root after `benchmarks/learning.py` has built DIR (its corpus, probes and teacher
WORKDIRs); each part prints its figures for benchmarks/RESULTS.md ("Third round"):

    .venv/bin/python benchmarks/learning_diagnose.py --dir DIR cqt                 # the CQT target
    .venv/bin/python benchmarks/learning_diagnose.py --dir DIR cqt --fmin 261.63   # the same from C4
    .venv/bin/python benchmarks/learning_diagnose.py --dir DIR readout [CKPT ...]  # the front end -> CQT
    .venv/bin/python benchmarks/learning_diagnose.py --dir DIR teacher kmeans100   # labels as features
    .venv/bin/python benchmarks/learning_diagnose.py --dir DIR teacher rvq         # all 8 codebooks

- **cqt**: how predictable `small.yaml`'s CQT target is from simple rules on random 2 s crops of the
  pretraining corpus: the corpus's average spectrum (what a model that ignores its input learns), the
  clip's own average, and a frame 1, 3 or 5 frames away (a masked span of 5 has visible frames that
  close). The trainer logs `cqt_mse` in the same unit: squared error per frame, a mean over bins.
- **readout**: a ridge regression from the conv front end's frames (with +-4 frames of context) of a
  random init, or of trained checkpoints, to the CQT, scored on crops of held-out files.
- **teacher**: each probe clip as the histogram of its teacher labels, through the probe's classifier and
  folds: how much of each task the labels themselves carry, beside MFCC mean+std.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

CROP = 48000  # small.yaml's crop_samples: 2 s at 24 kHz
TASKS = ("instrument", "pitch", "soundtrack")

if TYPE_CHECKING:
    from mert_pipeline.trainer.model import ModelConfig


def small_config(fmin: float | None = None) -> ModelConfig:
    """small.yaml's model config (its CQT from `fmin` when given), with one 100-class teacher head."""
    from mert_pipeline.trainer.pretrain import load_config

    cfg, _ = load_config(str(Path(__file__).resolve().parents[1] / "trainer/configs/small.yaml"), [])
    cfg.codebooks = [("kmeans100", 1, 100)]
    if fmin is not None:
        cfg.cqt_fmin = fmin
    return cfg


def corpus_crops(root: Path, per_file: int) -> tuple[torch.Tensor, int]:
    """`per_file` seeded random 2 s crops of every resampled corpus file, files in sorted order; and how
    many files there are (crops of one file are adjacent, so a split by index is a split by file)."""
    files = sorted((root / "work-kmeans100" / "audio_24k").glob("*/*.flac"))
    if not files:
        raise SystemExit(f"no resampled corpus under {root}/work-kmeans100: run benchmarks/learning.py first")
    rng = np.random.default_rng(0)
    crops = []
    for path in files:
        frames = sf.info(path).frames
        for _ in range(per_file):
            start = int(rng.integers(0, frames - CROP))
            crops.append(sf.read(path, start=start, frames=CROP, dtype="float32")[0])
    return torch.from_numpy(np.stack(crops)), len(files)


def cqt_targets(cfg: ModelConfig, audio: torch.Tensor) -> np.ndarray:
    """(clips, frames, bins): the trainer's own CQT target of each crop."""
    from mert_pipeline.trainer.model import CQT, conv_frames

    with torch.no_grad():
        return CQT(cfg)(audio, conv_frames(audio.shape[1], cfg)).numpy()


def octave_shares(err: np.ndarray, bins_per_octave: int) -> str:
    """Each octave's share of a squared error summed over bins, lowest octave first."""
    per_bin = err.reshape(-1, err.shape[-1]).mean(0)
    octaves = [per_bin[i : i + bins_per_octave].sum() for i in range(0, len(per_bin), bins_per_octave)]
    return " ".join(f"{o / per_bin.sum():.2f}" for o in octaves)


def cqt_part(root: Path, fmin: float | None) -> None:
    cfg = small_config(fmin)
    audio, _ = corpus_crops(root, per_file=6)
    spec = cqt_targets(cfg, audio)
    corpus_mean = spec.mean((0, 1))
    print(f"CQT from {cfg.cqt_fmin} Hz, {cfg.cqt_bins} bins: {len(spec)} crops of 2 s")
    print(f"  the corpus's average spectrum   {((spec - corpus_mean) ** 2).mean():.4f}")
    print(f"  the clip's own average spectrum {((spec - spec.mean(1, keepdims=True)) ** 2).mean():.4f}")
    for d in (5, 3, 1):
        print(f"  the frame {d} frame(s) away       {((spec[:, d:] - spec[:, :-d]) ** 2).mean():.4f}")
    shares = octave_shares((spec - corpus_mean) ** 2, cfg.cqt_bins_per_octave)
    print(f"  share of the average spectrum's error by octave, lowest first: {shares}")


def _flat(a: np.ndarray) -> np.ndarray:
    """(clips, frames, dims) -> (clips x frames, dims)."""
    return a.reshape(-1, a.shape[-1])


def readout_part(root: Path, checkpoints: list[Path]) -> None:
    from sklearn.linear_model import Ridge

    from mert_pipeline.hf_export import load_checkpoint
    from mert_pipeline.trainer.model import MERT, conv_frames

    cfg = small_config()
    audio, files = corpus_crops(root, per_file=4)
    spec = cqt_targets(cfg, audio)
    frames, k = conv_frames(CROP, cfg), 4
    train = (files * 3 // 4) * 4  # crops of the first three quarters of the files; the rest score
    for checkpoint in [None, *checkpoints]:
        torch.manual_seed(0)
        model = MERT(cfg).eval()
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)[1]
            prefix = "feature_extractor."
            front = {name[len(prefix) :]: v for name, v in state.items() if name.startswith(prefix)}
            model.feature_extractor.load_state_dict(front)
        with torch.no_grad():
            feats = torch.cat([model.feature_extractor(audio[i : i + 16]) for i in range(0, len(audio), 16)])
        feats = feats.transpose(1, 2)[:, :frames].numpy()
        context = np.concatenate([np.roll(feats, s, axis=1) for s in range(-k, k + 1)], -1)[:, k:-k]
        target = spec[:, k:-k]
        x_train, y_train = _flat(context[:train]), _flat(target[:train])
        x_test, y_test = _flat(context[train:]), _flat(target[train:])
        mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
        fit = Ridge(alpha=1.0).fit((x_train - mu) / sd, y_train)
        err = ((fit.predict((x_test - mu) / sd) - y_test) ** 2).mean()
        base = ((y_train.mean(0) - y_test) ** 2).mean()
        name = "random init" if checkpoint is None else checkpoint
        print(f"{name}: ridge {err:.4f} against the average spectrum's {base:.4f}: {err / base:.2f} left")


def teacher_part(root: Path, teacher: str) -> None:
    from learning import _rows as probe_rows  # the benchmark's own reader of DIR/probes/TASK.csv

    from mert_pipeline.embed import read_audio
    from mert_pipeline.probe import linear_probe, mfcc_features, probe_folds

    if teacher.startswith("kmeans"):
        from mert_pipeline.teachers.features import MFCC
        from mert_pipeline.teachers.kmeans import assign, last_centroids

        centroids, extractor = np.load(last_centroids(root / f"work-{teacher}")), MFCC()

        def histogram(audio: np.ndarray) -> np.ndarray:
            frames = assign(extractor(audio), centroids)
            return np.bincount(frames, minlength=len(centroids)) / len(frames)
    else:
        from mert_pipeline.teachers.rvq import encode_whole, load_codec

        model, _ = load_codec(root / "test_codec.pt")

        def histogram(audio: np.ndarray) -> np.ndarray:
            codes = encode_whole(model, audio).astype(np.int64)
            return np.concatenate([np.bincount(c, minlength=1024) / len(c) for c in codes])

    for task in TASKS:
        rows = probe_rows(root, task)
        audio = [read_audio(root / "probes" / row["path"]) for row in rows]
        labels = [row["label"] for row in rows]
        splits = probe_folds(labels, [row["group"] for row in rows], 4, 0)
        labelled = linear_probe(np.stack([histogram(a) for a in audio])[:, None], labels, splits=splits)
        baseline = linear_probe(mfcc_features(audio), labels, splits=splits)
        print(f"{teacher} {task}: label histogram {labelled['accuracy'][0]:.3f}", end=", ")
        print(f"MFCC mean+std {baseline['accuracy'][0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "mert-pipeline" / "learning")
    parts = parser.add_subparsers(dest="part", required=True)
    parts.add_parser("cqt").add_argument("--fmin", type=float, help="Hz (default: small.yaml's)")
    parts.add_parser("readout").add_argument("checkpoints", nargs="*", type=Path)
    parts.add_parser("teacher").add_argument("teacher", choices=["kmeans100", "rvq"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.dir.resolve()
    if args.part == "cqt":
        cqt_part(root, args.fmin)
    elif args.part == "readout":
        readout_part(root, args.checkpoints)
    else:
        teacher_part(root, args.teacher)


if __name__ == "__main__":
    main()
