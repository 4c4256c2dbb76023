"""`export fairseq`: the audio manifest and teacher labels in the files the official MERT fairseq task reads.

- `train.tsv` / `valid.tsv`: the audio directory on the first line, then `relpath<TAB>num_samples`;
- `{split}.encodec_{i}` for each codebook i of an EnCodec teacher and `{split}.km` for a single-codebook
  (k-means) teacher: one line per tsv row, the frame labels as space-separated integers;
- `dict.{label}.txt`: `<id> 1` for every id the teacher can emit (fairseq adds its 4 special symbols).

A row goes into the tsv only when every selected teacher has labels for it, so every label file has
exactly as many lines as its tsv has rows; dropped rows go to `rejects.jsonl` with their reason. Every
file is written to a temporary name and all are renamed together at the end.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mert_pipeline.fs import atomic_path, atomic_write_json
from mert_pipeline.grid import SAMPLE_RATE
from mert_pipeline.labels import load_aligned, load_labels, teacher_facts
from mert_pipeline.layout import Workdir
from mert_pipeline.manifests.io import RejectsWriter, iter_batches
from mert_pipeline.manifests.records import Reject
from mert_pipeline.shards import REJECTS, SPLITS


def label_names(facts: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Teacher -> the fairseq label name of each codebook: `encodec_{i}` for EnCodec, `km` for a
    single-codebook teacher, `{teacher}_{i}` otherwise. Names must not collide."""
    names: dict[str, list[str]] = {}
    for teacher, fact in facts.items():
        if str(fact["kind"]).startswith("encodec"):
            names[teacher] = [f"encodec_{i}" for i in range(fact["n_q"])]
        elif fact["n_q"] == 1:
            names[teacher] = ["km"]
        else:
            names[teacher] = [f"{teacher}_{i}" for i in range(fact["n_q"])]
    seen: dict[str, str] = {}
    for teacher, labels in names.items():
        for label in labels:
            if label in seen:
                raise ValueError(
                    f"teachers {seen[label]!r} and {teacher!r} would both write the label {label!r}; "
                    f"export them one at a time into different folders"
                )
            seen[label] = teacher
    return names


def export_fairseq(
    workdir: Path,
    out: Path,
    teachers: list[str],
    sample_rate: int = SAMPLE_RATE,
    on_row: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write the fairseq files for `teachers` into `out`; return the summary (counts and outputs)."""
    layout = Workdir(workdir)
    audio_dir = layout.audio(sample_rate).path
    manifest = layout.audio(sample_rate).manifest
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: run `mert-pipe resample {workdir}` first")
    facts = teacher_facts(workdir, teachers)
    names = label_names(facts)
    tables = {name: load_labels(layout.labels(name)) for name in facts}
    hop = next(iter(facts.values()))["hop"]
    words = {name: [str(i) for i in range(fact["num_classes"])] for name, fact in facts.items()}
    counts: Counter = Counter()
    outputs = [f"{split}.tsv" for split in SPLITS]
    outputs += [f"{split}.{label}" for split in SPLITS for labels in names.values() for label in labels]
    with contextlib.ExitStack() as stack:
        handles: dict[str, TextIO] = {}
        for name in outputs:
            tmp = stack.enter_context(atomic_path(out / name))
            handles[name] = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        for split in SPLITS:
            handles[f"{split}.tsv"].write(str(audio_dir.resolve()) + "\n")
        rejects = stack.enter_context(RejectsWriter(out / REJECTS))
        for batch in iter_batches(manifest, columns=["id", "path", "relpath", "num_samples", "split"]):
            for row in batch.to_pylist():
                counts["files_seen"] += 1
                reject = _missing(row, facts, tables, workdir)
                if reject is not None:
                    rejects.write(reject)
                    counts[f"rejected.{reject.reason}"] += 1
                    continue
                split = row["split"]
                handles[f"{split}.tsv"].write(f"{row['relpath']}\t{row['num_samples']}\n")
                for teacher, fact in facts.items():
                    path = layout.labels(teacher).npy(tables[teacher][row["id"]][0])
                    labels = load_aligned(path, fact["n_q"], row["num_samples"], hop)
                    table = words[teacher]
                    for codebook, label in enumerate(names[teacher]):
                        line = " ".join([table[v] for v in labels[codebook].tolist()])
                        handles[f"{split}.{label}"].write(line + "\n")
                counts["accepted"] += 1
                counts[f"rows.{split}"] += 1
                counts["audio_seconds"] += row["num_samples"] / sample_rate
                if on_row is not None:
                    on_row()
        for teacher, fact in facts.items():
            lines = "".join(f"{i} 1\n" for i in range(fact["num_classes"]))
            for label in names[teacher]:
                with atomic_path(out / f"dict.{label}.txt") as tmp:
                    tmp.write_text(lines)
    counts["rejected"] = sum(v for k, v in counts.items() if k.startswith("rejected."))
    summary = {
        "counts": {key: counts[key] for key in sorted(counts)},
        "teachers": facts,
        "labels": names,
        "label_rate": sample_rate / hop,
        "outputs": {"fairseq": str(out)},
    }
    atomic_write_json(out / "export.json", summary)
    return summary


def _missing(
    row: dict[str, Any], facts: dict[str, dict[str, Any]], tables: dict[str, dict], workdir: Path
) -> Reject | None:
    for name, fact in facts.items():
        found = tables[name].get(row["id"])
        if found is None:
            return Reject(row["path"], "no_labels", f"teacher {name!r} has no labels for this file")
        if found[1] != fact["config_hash"] or found[2] != row["num_samples"]:
            npy = Workdir(workdir).labels(name).npy(found[0])
            return Reject(
                row["path"], "label_mismatch", f"{npy} was made for {found[2]} samples with config {found[1]}"
            )
    return None
