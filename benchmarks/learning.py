"""Do the teachers teach? End to end on real recorded music: pipeline, `small.yaml` on the CPU, probes.

Run from the repository root (after `pip install -e .`; Debian's apt-get and fluidsynth on the machine):

    .venv/bin/python benchmarks/learning.py                     # both teachers, figures for RESULTS.md
    .venv/bin/python benchmarks/learning.py --teachers kmeans100 # the MFCC k-means teacher only
    .venv/bin/python benchmarks/learning.py --name lr3e-3 lr=3e-3 # another run of small.yaml, overridden
    .venv/bin/python benchmarks/learning.py --teachers bestrq,kmeans100+bestrq,iter100@kmeans100

A teacher is any `mert-pipe run --teachers` name (`kmeans100`: MFCC k-means, `rvq`, `bestrq`, ...), several
joined by `+` (one WORKDIR labelled by each, one training on all of them, as MERT trains on 8 codebooks),
or `iterK@BASE`: HuBERT's second iteration, `mert-pipe iterate` on BASE's WORKDIR from BASE's trained run
(k = K, the layer chosen by the command), then a training on the new labels alone.

Every step is kept in --dir and skipped when done, so an interrupted benchmark resumes:
1. **data** (benchmarks/learning_data.py): about 2.6 hours of Debian's game soundtracks, fetched with
   `apt-get download`, as the pretraining corpus; probe tasks on real recorded sound held out of it
   (instrument family and pitch class of notes played through the Fluid R3 soundfont by fluidsynth, and
   which game a 10 s clip of a held-out track comes from), grouped by instrument or track.
2. **pipeline**: `mert-pipe run` with each teacher (`kmeans100`: MFCC k-means; `rvq`: EnCodec on the test
   codec, random weights of the real architecture, since the real weights cannot be fetched here).
3. **train**: `mert-pipe train --config small` on the teacher's shards; wall time and loss curve.
4. **probe**: `mert-pipe probe` on every task for several checkpoints of the run (so the trend over
   training shows), each against its random init and MFCC mean+std through the same classifier and folds,
   with each layer pooled two ways (`--pool mean`, MARBLE's; `--pool meanstd`, as the MFCC baseline is),
   and each checkpoint's collapse figure (the trainer's cross-clip cosine of the last layer).
5. **label quality**: the teacher's frame labels on the probe notes against their instrument family and
   pitch class (mutual information over the class's entropy, as `kmeans report` measures it; for the RVQ
   teacher every 4th note, EnCodec being slow on the CPU).
6. **report**: DIR/RUN/learning.json and a markdown table to paste into benchmarks/RESULTS.md.

`benchmarks/learning_diagnose.py --dir DIR` then measures, on the same DIR, why a task falls short: how
predictable the CQT target is, what the front end's frames hold of it, and what the teachers' labels hold
about each probe task.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_data  # noqa: E402

TASKS = ("instrument", "pitch", "soundtrack")
MERT_PIPE = [sys.executable, "-m", "mert_pipeline"]


def step(name: str) -> None:
    print(f"\n== {name} ({time.strftime('%H:%M:%S')})", flush=True)


def label_sets(teacher: str) -> list[str]:
    """The label sets a teacher spec trains on: `a+b` -> [a, b]; `iterK@BASE` -> [iterK]."""
    return [teacher.split("@")[0]] if "@" in teacher else teacher.split("+")


def workdir(root: Path, teacher: str) -> Path:
    """An iteration adds its labels to its base's WORKDIR (and sidecars to its shards)."""
    return root / f"work-{teacher.split('@')[1] if '@' in teacher else teacher}"


def pipeline(root: Path, teacher: str, name: str) -> dict[str, float]:
    """`mert-pipe run` on the corpus with the spec's teachers (or `mert-pipe iterate` from the base's run);
    its own timing from WORKDIR/stats/run.json (or the iteration's wall time)."""
    if "@" in teacher:
        return iterate(root, teacher, name)
    work = workdir(root, teacher)
    done = work / "stats" / "run.json"
    if not done.exists():
        extra = []
        if "rvq" in label_sets(teacher):
            from mert_pipeline.demo.test_codec import make_test_codec

            codec = root / "test_codec.pt"
            if not codec.exists():
                make_test_codec(codec)
            extra = ["--codec-checkpoint", str(codec)]
        teachers = ",".join(label_sets(teacher))
        cmd = [*MERT_PIPE, "run", str(root / "corpus"), "--out", str(work), "--teachers", teachers, *extra]
        subprocess.run(cmd, check=True)
    stats = json.loads(done.read_text())
    stages = {s["stage"]: round(float(s["seconds"]), 1) for s in stats.get("stages", [])}
    hours = stats["stages"][0]["counts"].get("audio_seconds", 0.0) / 3600 if stats.get("stages") else 0.0
    return {"seconds": round(float(stats.get("seconds", 0.0)), 1), "hours": round(hours, 3), "stages": stages}


def iterate(root: Path, teacher: str, name: str) -> dict[str, float]:
    """`mert-pipe iterate` on BASE's WORKDIR from BASE's run (`iterK@BASE`); its wall time."""
    label, base = teacher.split("@")
    timing = root / "runs" / f"{name}-{teacher}.iterate_seconds.json"  # beside the run: train wants it empty
    if not timing.exists():
        k = label[len("iter") :]
        start = time.perf_counter()
        cmd = [
            *MERT_PIPE,
            "iterate",
            str(workdir(root, teacher)),
            "--from",
            str(root / "runs" / f"{name}-{base}"),
        ]
        subprocess.run([*cmd, "--k", k, "--name", label, "--device", "cpu"], check=True)
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    seconds = float(json.loads(timing.read_text())["seconds"])
    return {"seconds": round(seconds, 1), "hours": 0.0, "stages": {"iterate": round(seconds, 1)}}


def note_labels(root: Path, teacher: str, label: str) -> tuple[list[np.ndarray | None], int]:
    """Label set `label`'s frame labels (its first codebook) of every probe note, in instrument.csv +
    pitch.csv order, and its number of classes: k-means sets (MFCC, music, a model's layer) through the
    teacher `tokenize` ran, BEST-RQ through its saved quantizer, RVQ through the test codec."""
    from mert_pipeline.embed import read_audio

    paths = [root / "probes" / row["path"] for task in ("instrument", "pitch") for row in _rows(root, task)]
    work = workdir(root, teacher)
    facts = json.loads((work / "labels" / label / "teacher.json").read_text())
    if facts["kind"] in ("kmeans", "bestrq"):
        extractor, to_labels, k = _feature_teacher(work, facts)
        return [to_labels(extractor(read_audio(p))) for p in paths], k
    paths = [p if i % 4 == 0 else None for i, p in enumerate(paths)]  # EnCodec on the CPU: every 4th note
    from mert_pipeline.teachers.rvq import encode_whole, load_codec

    model, _ = load_codec(root / "test_codec.pt")
    codes = [None if p is None else encode_whole(model, read_audio(p))[0].astype(np.int64) for p in paths]
    return codes, 1024


def _feature_teacher(work: Path, facts: dict) -> tuple:
    """(extractor, features -> first-codebook labels, classes) of a k-means or BEST-RQ label set, rebuilt
    from the files its teacher.json names by hash (the fit's centroids, the saved quantizer)."""
    config = facts["config"]
    if facts["kind"] == "bestrq":
        from mert_pipeline.teachers.bestrq import BestRQ
        from mert_pipeline.teachers.features import LogMel

        quantizer = BestRQ.load(work / "bestrq" / f"{config['quantizer_hash']}.npz")
        return (
            LogMel(),
            lambda f: quantizer.labels(f).reshape(quantizer.num_codebooks, -1)[0],
            facts["num_classes"],
        )
    from mert_pipeline.teachers.kmeans import assign, fitted_teacher

    teacher = fitted_teacher(work, config["centroids_sha256"])
    if teacher.model is not None:
        teacher = dataclasses.replace(teacher, model=dataclasses.replace(teacher.model, device="cpu"))
    extractor, centroids = teacher._state()
    return extractor, lambda f: assign(f, centroids), len(centroids)


def label_quality(root: Path, teacher: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per label set and task, MI(label; class) / H(class) and class purity over the probe notes' frames."""
    return {label: _label_quality(root, teacher, label) for label in label_sets(teacher)}


def _label_quality(root: Path, teacher: str, label: str) -> dict[str, dict[str, float]]:
    from mert_pipeline.teachers.kmeans import JointCounts

    labels, k = note_labels(root, teacher, label)
    out, offset = {}, 0
    for task in ("instrument", "pitch"):
        rows = _rows(root, task)
        names = sorted({row["label"] for row in rows})
        counts = JointCounts(len(names), k)
        for row, frames in zip(rows, labels[offset : offset + len(rows)], strict=True):
            if frames is not None:
                counts.update(np.full(len(frames), names.index(row["label"])), frames)
        offset += len(rows)
        m = counts.metrics()
        out[task] = {
            "mi_over_h_class": round(m["mi_over_entropy_a"], 4),
            "purity_class_given_label": round(m["purity_a_given_b"], 4),
        }
    return out


def _rows(root: Path, task: str) -> list[dict[str, str]]:
    with (root / "probes" / f"{task}.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def train(root: Path, teacher: str, run: Path, overrides: list[str]) -> float:
    """`mert-pipe train --config small` on the teacher's shards; its wall time in seconds."""
    timing = run / "wall_seconds.json"
    if not timing.exists():
        start = time.perf_counter()
        cmd = [*MERT_PIPE, "train", "--config", "small", "--shards", str(workdir(root, teacher) / "shards")]
        cmd += ["--out", str(run), f"teachers=[{','.join(label_sets(teacher))}]", *overrides]
        subprocess.run(cmd, check=True)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return float(json.loads(timing.read_text())["seconds"])


POOLS = ("mean", "meanstd")  # the probe's pooling of a layer's frames: MARBLE's mean; mean and std as MFCC's


def probe(root: Path, run: Path, checkpoint: Path, baselines: bool) -> dict[str, dict]:
    """Every task on one checkpoint with each pooling (with the random-init and MFCC baselines when
    `baselines`); {pool: {task: probe.json's results}, "collapse": ...}."""
    from mert_pipeline.probe import run_probe

    results: dict[str, dict] = {}
    for pool in POOLS:
        results[pool] = {}
        for task in TASKS:
            out = run / "probe" / checkpoint.stem / (task if pool == "mean" else f"{task}-{pool}")
            if not (out / "probe.json").exists():
                data = str(root / "probes" / f"{task}.csv")
                run_probe(checkpoint, data, out, baseline=baselines, pool=pool, device="cpu")
            results[pool][task] = json.loads((out / "probe.json").read_text())["results"]
    results["collapse"] = collapse(root, checkpoint)
    return results


def collapse(root: Path, checkpoint: Path) -> dict[str, float]:
    """The trainer's collapse figure (cross-clip cosine of the last layer) of the checkpoint and of its
    random init, on the first 2 s of 16 soundtrack clips."""
    import torch

    from mert_pipeline.embed import load_embedder, read_audio
    from mert_pipeline.trainer.pretrain import cross_clip_cosine

    rows = _rows(root, "soundtrack")[:: max(1, len(_rows(root, "soundtrack")) // 16)][:16]
    audio = torch.from_numpy(np.stack([read_audio(root / "probes" / r["path"])[:48000] for r in rows]))
    out = {}
    for name, random_init in (("trained", False), ("random init", True)):
        states = load_embedder(checkpoint, "cpu", random_init=random_init).hidden_states(audio)
        out[name] = round(float(cross_clip_cosine(states[-1])), 3)
    return out


def curve(run: Path) -> dict[str, list[dict[str, float]]]:
    """The logged points: training (step, loss, masked-prediction accuracy, CQT error) and validation (the
    same, and `collapse`, the cross-clip cosine of the last layer)."""
    points: dict[str, list[dict[str, float]]] = {"train": [], "valid": []}
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") in points and "loss" in row:
            keep = {
                k: v
                for k, v in row.items()
                if k in ("step", "collapse") or k.startswith(("loss", "acc_", "cqt"))
            }
            points[row["kind"]].append(keep)
    return points


def table(teacher: str, summary: dict) -> str:
    """Markdown: per task, each probed checkpoint's best layer against random init and MFCC."""
    by_step = []
    for v in summary["curve"]["valid"]:
        acc = next((a for k, a in v.items() if k.startswith("acc_")), 0.0)
        by_step.append(f"{v['step']}: {acc:.3f}")
    final = summary["probes"][summary["final"]]
    collapsed = ", ".join(f"{name} {r['collapse']['trained']:.2f}" for name, r in summary["probes"].items())
    lines = [
        f"**{teacher}**: pipeline {summary['pipeline']['seconds']} s, "
        f"training {summary['train_seconds'] / 60:.1f} min",
        "",
        f"- label quality on the probe notes (MI / H(class)): {summary['label_quality']}",
        "- validation masked accuracy by step: "
        + (", ".join(by_step) or "none logged (valid split too small)"),
        "- collapse, the cross-clip cosine of the last layer "
        f"(random init {final['collapse']['random init']:.2f}): {collapsed}",
        "",
        "| task | pool | checkpoint | trained, by layer | best | random init | MFCC | vs random | vs MFCC |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for pool in POOLS:
        for task in TASKS:
            base = final[pool][task]
            rand, mfcc = base["random init"]["best_accuracy"], base["MFCC"]["best_accuracy"]
            for name, results in summary["probes"].items():
                r = results[pool][task]["trained"]
                layers = " ".join(f"{a:.2f}" for a in r["accuracy"])
                best = r["best_accuracy"]
                lines.append(
                    f"| {task} | {pool} | {name} | {layers} | {best:.3f} | {rand:.3f} | {mfcc:.3f} | "
                    f"{100 * (best - rand):+.1f} | {100 * (best - mfcc):+.1f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "mert-pipeline" / "learning")
    parser.add_argument(
        "--teachers",
        default="kmeans100,rvq",
        help="comma-separated: run teacher names (kmeans100, rvq, bestrq, ...), a+b combinations, iterK@BASE",
    )
    parser.add_argument("--name", default="small", help="the run's name (a folder per teacher)")
    parser.add_argument("--probe-steps", default="250,500,1000,last", help="checkpoints to probe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of small.yaml")
    args = parser.parse_args()
    root = args.dir.resolve()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    step("data: Debian's game soundtracks and the probe tasks")
    corpus = learning_data.build_corpus(root)
    notes = learning_data.build_note_probes(root)
    print(json.dumps({**corpus, **notes}))
    for teacher in args.teachers.split(","):
        step(f"pipeline: {teacher}")
        timing = pipeline(root, teacher, args.name)
        run = root / "runs" / f"{args.name}-{teacher}"
        step(f"train: small.yaml on the {teacher} shards -> {run}")
        seconds = train(root, teacher, run, args.overrides)
        from mert_pipeline.trainer.pretrain import checkpoints

        ckpts = {int(p.stem.split("-")[1]): p for p in checkpoints(run)}
        wanted = [max(ckpts) if s == "last" else int(s) for s in args.probe_steps.split(",")]
        probes = {}
        for s in sorted({s for s in wanted if s in ckpts}):
            step(f"probe: {run.name} step {s}")
            probes[f"step {s}"] = probe(root, run, ckpts[s], baselines=s == max(ckpts))
        step(f"label quality of {teacher} on the probe notes")
        quality = label_quality(root, teacher)
        print(json.dumps(quality))
        summary = {
            "teacher": teacher,
            "overrides": args.overrides,
            "corpus": corpus,
            "pipeline": timing,
            "label_quality": quality,
            "train_seconds": round(seconds, 1),
            "curve": curve(run),
            "final": f"step {max(ckpts)}",
            "probes": probes,
        }
        (run / "learning.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(table(teacher, summary))


if __name__ == "__main__":
    main()
