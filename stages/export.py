"""`export fairseq`: the audio manifest and teacher labels in the files the official MERT fairseq task reads.

- `train.tsv` / `valid.tsv`: the audio directory on the first line, then `relpath<TAB>num_samples`;
- `{split}.encodec_{i}` for each codebook i of an EnCodec teacher and `{split}.km` for a single-codebook
  (k-means) teacher: one line per tsv row, the frame labels as space-separated integers;
- `dict.{label}.txt`: `<id> 1` for every id the teacher can emit (fairseq adds its 4 special symbols).

With `sharding` N (>= 2) the train rows go to `train_{i}_{N}.tsv` and `train_{i}_{N}.{label}` for i in
0..N-1 instead of `train.*`: the names the official task (`mert_fairseq/tasks/mert_pretraining.py`) reads
with `task.sharding_data=N`, one shard per epoch; it reads `train.tsv` only when `sharding_data <= 1`, so
only one of the two layouts is written. Every shard tsv starts with the root line. Row k of the accepted
train rows goes to shard k mod N (round-robin): the manifest is in source-path order, so contiguous
shards would give each epoch one corner of the corpus (a few folders), while round-robin makes every
shard an even sample of it, with row counts within one of each other, without knowing the count first.
`valid.*` is never sharded (the task reads `valid.tsv` whatever `sharding_data` is).

A row goes into the tsv only when every selected teacher has labels for it, so every label file has
exactly as many lines as its tsv has rows; dropped rows go to `rejects.jsonl` with their reason. Every
file is written to a temporary name and all are renamed together at the end; data files that an earlier
export into the same folder wrote and this one does not (another layout, another teacher) are then removed,
so the folder never mixes two exports.
"""

from __future__ import annotations

import contextlib
import json
import resource
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mert_pipeline.fs import atomic_path, atomic_write_json
from mert_pipeline.grid import SAMPLE_RATE
from mert_pipeline.labels import LabelIndex, label_index, load_aligned, teacher_facts
from mert_pipeline.layout import Workdir
from mert_pipeline.manifests.io import RejectsWriter, iter_batches
from mert_pipeline.manifests.records import Reject
from mert_pipeline.shards import REJECTS, SPLITS

SUMMARY = "export.json"
SHARD_ORDER = "round-robin"  # train row k (in manifest order, after rejects) -> shard k mod N


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


def check_sharding(sharding: int) -> None:
    """0 (off) or N >= 2: the official task reads `train.tsv` for any `sharding_data <= 1`, so shard
    files for N = 1 would never be read."""
    if sharding < 0 or sharding == 1:
        raise ValueError(
            f"--sharding {sharding}: give 0 (one train.tsv) or N >= 2 (train_{{i}}_N.tsv); the official "
            f"task reads train.tsv whenever task.sharding_data <= 1"
        )


def stems(sharding: int) -> list[str]:
    """The file stems (name before `.tsv` / `.{label}`) of one export, train first."""
    train = [f"train_{i}_{sharding}" for i in range(sharding)] if sharding else ["train"]
    return train + [split for split in SPLITS if split != "train"]


def data_files(labels: list[str], sharding: int) -> list[str]:
    """Every tsv, label and dictionary file name an export of `labels` with `sharding` writes."""
    names = []
    for stem in stems(sharding):
        names += [f"{stem}.tsv", *(f"{stem}.{label}" for label in labels)]
    return names + [f"dict.{label}.txt" for label in labels]


def export_fairseq(
    workdir: Path,
    out: Path,
    teachers: list[str],
    sample_rate: int = SAMPLE_RATE,
    on_row: Callable[[], None] | None = None,
    sharding: int = 0,
) -> dict[str, Any]:
    """Write the fairseq files for `teachers` into `out` (train rows in `sharding` shards when >= 2);
    return the summary (counts, sharding and outputs), also written to `out/export.json`."""
    check_sharding(sharding)
    layout = Workdir(workdir)
    audio_dir = layout.audio(sample_rate).path
    manifest = layout.audio(sample_rate).manifest
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: run `mert-pipe resample {workdir}` first")
    facts = teacher_facts(workdir, teachers)
    names = label_names(facts)
    labels_all = [label for labels in names.values() for label in labels]
    tables = {name: label_index(layout.labels(name)) for name in facts}  # columns, not a dict per file
    if sharding:
        train_rows = _count_rows(manifest, "train", facts, tables, workdir)
        if sharding > train_rows:
            raise ValueError(
                f"--sharding {sharding} needs at least {sharding} train rows (every shard non-empty); "
                f"this export has {train_rows}"
            )
    earlier = _earlier_files(out)
    hop = next(iter(facts.values()))["hop"]
    words = {name: [str(i) for i in range(fact["num_classes"])] for name, fact in facts.items()}
    counts: Counter = Counter()
    shard_rows = [0] * sharding
    outputs = [f"{stem}.{ext}" for stem in stems(sharding) for ext in ["tsv", *labels_all]]
    _allow_open_files(len(outputs) + 64)  # 64: the rejects file, parquet reads, the interpreter's own
    with contextlib.ExitStack() as stack:
        handles: dict[str, TextIO] = {}
        for name in outputs:
            tmp = stack.enter_context(atomic_path(out / name))
            handles[name] = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        for stem in stems(sharding):
            handles[f"{stem}.tsv"].write(str(audio_dir.resolve()) + "\n")
        rejects = stack.enter_context(RejectsWriter(out / REJECTS))
        for batch in iter_batches(manifest, columns=["id", "path", "relpath", "num_samples", "split"]):
            for row in batch.to_pylist():
                counts["files_seen"] += 1
                reject = _missing(row, facts, tables, workdir)
                if reject is not None:
                    rejects.write(reject)
                    counts[f"rejected.{reject.reason}"] += 1
                    continue
                split = stem = row["split"]
                if split == "train" and sharding:
                    shard = counts["rows.train"] % sharding
                    stem = f"train_{shard}_{sharding}"
                    shard_rows[shard] += 1
                handles[f"{stem}.tsv"].write(f"{row['relpath']}\t{row['num_samples']}\n")
                for teacher, fact in facts.items():
                    found = tables[teacher].get(row["id"])
                    assert found is not None  # `_missing` passed the row
                    path = layout.labels(teacher).npy(found[0])
                    labels = load_aligned(path, fact["n_q"], row["num_samples"], hop)
                    table = words[teacher]
                    for codebook, label in enumerate(names[teacher]):
                        line = " ".join([table[v] for v in labels[codebook].tolist()])
                        handles[f"{stem}.{label}"].write(line + "\n")
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
    for stale in sorted(earlier - set(data_files(labels_all, sharding))):
        (out / stale).unlink(missing_ok=True)
    counts["rejected"] = sum(v for k, v in counts.items() if k.startswith("rejected."))
    summary = {
        "counts": {key: counts[key] for key in sorted(counts)},
        "teachers": facts,
        "labels": names,
        "label_rate": sample_rate / hop,
        "sharding": {
            "shards": sharding,
            "order": SHARD_ORDER if sharding else None,
            "train": [f"train_{i}_{sharding}" for i in range(sharding)] if sharding else ["train"],
            "rows": shard_rows if sharding else [counts["rows.train"]],
        },
        "outputs": {"fairseq": str(out)},
    }
    atomic_write_json(out / SUMMARY, summary)
    return summary


def _count_rows(
    manifest: Path, split: str, facts: dict[str, dict[str, Any]], tables: dict[str, dict], workdir: Path
) -> int:
    """Rows of `split` the export will accept: known before anything is written, so an impossible
    `--sharding` fails at once rather than after every label file is read."""
    total = 0
    for batch in iter_batches(manifest, columns=["id", "path", "num_samples", "split"]):
        for row in batch.to_pylist():
            if row["split"] == split and _missing(row, facts, tables, workdir) is None:
                total += 1
    return total


def _earlier_files(out: Path) -> set[str]:
    """The data files an earlier export into `out` wrote, from its export.json (none if absent or
    unreadable): only files this stage itself wrote are ever removed."""
    try:
        earlier = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
        labels = [label for group in earlier["labels"].values() for label in group]
        sharding = int(earlier.get("sharding", {}).get("shards", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return set(data_files(labels, sharding))


def _allow_open_files(needed: int) -> None:
    """Raise this process's soft open-file limit to `needed` (every shard x label file is open at once,
    which is what lets rows stream); a one-line error if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise ValueError(
            f"this export keeps {needed} files open but the open-file limit is {hard}: "
            f"use a smaller --sharding or raise `ulimit -n`"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _missing(
    row: dict[str, Any], facts: dict[str, dict[str, Any]], tables: dict[str, LabelIndex], workdir: Path
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
