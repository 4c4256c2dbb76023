"""`mert-pipe stats`: dataset and label statistics of a WORKDIR or a SHARDS folder, as JSON, Markdown and PNG.

From a WORKDIR: files and hours of the manifest (and of the resampled audio), rejects by stage and
reason, the duration histogram, and for every label set in WORKDIR/labels its codebook usage. From a
SHARDS folder: the same from index.json and the samples themselves (segments, not source files), rejects
from SHARDS/rejects.jsonl. Codebook figures come from `mert_pipeline.teachers.kmeans` (cluster_usage,
JointCounts):
per codebook the codes used, the label entropy H (bits) and the perplexity 2^H; between every two
teachers the mutual information of their first codebooks (the coarsest RVQ level) frame by frame, with
I / H and normalised MI. Labels are read one file (or shard) at a time.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from mert_pipeline import storage
from mert_pipeline.fs import atomic_path, atomic_write_json, atomic_write_text
from mert_pipeline.labels import label_sets, load_labels
from mert_pipeline.layout import Workdir
from mert_pipeline.shards import INDEX, REJECTS, SegmentMeta, load_index, read_samples
from mert_pipeline.storage import Location, is_url, join
from mert_pipeline.teachers import test_weights_warning
from mert_pipeline.teachers.kmeans import JointCounts, usage_from_counts

DURATION_BINS = (0, 1, 3, 5, 10, 30, 60, 120, 300, 600, math.inf)  # seconds


class LabelCounts:
    """Per-teacher per-codebook histograms and per-pair joint histograms of codebook 0, file by file."""

    def __init__(self, teachers: dict[str, tuple[int, int]]) -> None:
        self.teachers = dict(sorted(teachers.items()))
        self.hist = {name: np.zeros((n_q, k), np.int64) for name, (n_q, k) in self.teachers.items()}
        self.joint = {
            (a, b): JointCounts(self.teachers[a][1], self.teachers[b][1])
            for a, b in combinations(self.teachers, 2)
        }

    def update(self, labels: dict[str, np.ndarray]) -> None:
        for name, array in labels.items():
            array = np.asarray(array).astype(np.int64)
            k = self.teachers[name][1]
            if array.size and (array.min() < 0 or array.max() >= k):
                raise ValueError(f"{name}: labels outside [0, {k})")
            for q, row in enumerate(array):
                self.hist[name][q] += np.bincount(row, minlength=k)
        for (a, b), joint in self.joint.items():
            if a in labels and b in labels:
                frames = min(labels[a].shape[1], labels[b].shape[1])
                joint.update(labels[a][0, :frames], labels[b][0, :frames])

    def summary(self) -> dict[str, Any]:
        teachers = {}
        for name, hist in self.hist.items():
            rows = [{**usage_from_counts(row), "counts": row.tolist()} if row.sum() else None for row in hist]
            teachers[name] = {
                "n_q": self.teachers[name][0],
                "num_classes": self.teachers[name][1],
                "codebooks": rows,
            }
        agreement = {
            f"{a}~{b}": joint.metrics() for (a, b), joint in self.joint.items() if joint.counts.sum()
        }
        return {"teachers": teachers, "agreement": agreement}


def _histogram(durations: np.ndarray) -> list[dict[str, Any]]:
    counts, _ = np.histogram(durations, bins=np.array(DURATION_BINS, dtype=float))
    return [
        {"from": lo, "to": hi if math.isfinite(hi) else None, "files": int(n)}
        for lo, hi, n in zip(DURATION_BINS[:-1], DURATION_BINS[1:], counts, strict=True)
    ]


def _rejects(path: Location) -> dict[str, int]:
    if not storage.exists(path):
        return {}
    counts: Counter = Counter()
    for line in storage.read_bytes(path).decode("utf-8").splitlines():
        if line.strip():
            counts[json.loads(line)["reason"]] += 1
    return dict(sorted(counts.items()))


def _read_column(path: Path, columns: list[str]) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns).to_pydict()


def workdir_stats(workdir: Path) -> dict[str, Any]:
    """Statistics of a WORKDIR (manifest.parquet, audio_24k/, labels/*/)."""
    layout = Workdir(workdir)
    manifest = _read_column(layout.manifest, ["id", "duration", "split"])
    durations = np.array(manifest["duration"], dtype=float)
    stats: dict[str, Any] = {
        "source": str(workdir),
        "kind": "workdir",
        "files": len(durations),
        "hours": float(durations.sum() / 3600),
        "splits": dict(sorted(Counter(manifest["split"]).items())),
        "durations": _duration_summary(durations),
        "rejects": {"manifest": _rejects(layout.rejects)},
    }
    audio = layout.audio()
    if audio.manifest.exists():
        rows = _read_column(audio.manifest, ["duration"])
        stats["resampled"] = {"files": len(rows["duration"]), "hours": float(sum(rows["duration"]) / 3600)}
        rejects = _rejects(audio.rejects)  # dedup's rejects join resample's in the audio rejects
        stats["rejects"]["resample"] = {k: v for k, v in rejects.items() if k != "near_duplicate"}
        if "near_duplicate" in rejects:
            stats["rejects"]["dedup"] = {"near_duplicate": rejects["near_duplicate"]}
    if layout.dedup.summary.exists():
        found = json.loads(layout.dedup.summary.read_text())
        counts = found.get("counts", {})
        stats["dedup"] = {
            "groups": counts.get("groups", 0),
            "dropped_files": counts.get("dropped", 0),
            "dropped_hours": counts.get("dropped_hours", 0.0),
            "kept_by_keep_list": counts.get("kept_by_keep_list", 0),
            "examples": found.get("examples", []),
        }
    teachers, tables = {}, {}
    for name, facts in label_sets(workdir).items():
        label_set = layout.labels(name)
        teachers[name] = (int(facts["n_q"]), int(facts["num_classes"]))
        tables[name] = {file_id: row[0] for file_id, row in load_labels(label_set).items()}
        stats["rejects"][f"labels/{name}"] = _rejects(label_set.rejects)
    stats["warnings"] = [
        w for name, facts in label_sets(workdir).items() if (w := test_weights_warning(name, facts))
    ]
    counts = LabelCounts(teachers)
    for file_id in sorted(set().union(*[set(t) for t in tables.values()]) if tables else []):
        counts.update(
            {name: np.load(layout.labels(name).npy(t[file_id])) for name, t in tables.items() if file_id in t}
        )
    stats.update(counts.summary())
    return stats


def shards_stats(shards: Location) -> dict[str, Any]:
    """Statistics of a SHARDS folder: segments from the audio shards' KEY.json, labels from KEY.<t>.npy
    (sidecars merged in by the shard reader), rejects from SHARDS/rejects.jsonl."""
    index = load_index(shards)
    counts = LabelCounts(index.teachers)
    durations, splits, files = [], Counter(), set()
    for split, entries in sorted(index.shards.items()):
        for name, _ in entries:
            for sample in read_samples(index, name):
                meta = SegmentMeta.from_bytes(sample["json"])
                durations.append(meta.num_samples / meta.sample_rate)
                splits[split] += 1
                files.add(meta.id)
                counts.update(
                    {
                        ext[:-4]: np.load(io.BytesIO(data), allow_pickle=False)
                        for ext, data in sample.items()
                        if ext.endswith(".npy")
                    }
                )
    array = np.array(durations, dtype=float)
    return {
        "source": str(shards),
        "kind": "shards",
        "files": len(files),
        "segments": len(array),
        "hours": float(array.sum() / 3600),
        "splits": dict(sorted(splits.items())),
        "durations": _duration_summary(array),
        "rejects": {"shard": _rejects(join(shards, REJECTS))},
        "warnings": list(index.warnings),
        **counts.summary(),
    }


def _duration_summary(durations: np.ndarray) -> dict[str, Any]:
    if not len(durations):
        return {"min": 0.0, "median": 0.0, "mean": 0.0, "max": 0.0, "histogram": _histogram(durations)}
    return {
        "min": float(durations.min()),
        "median": float(np.median(durations)),
        "mean": float(durations.mean()),
        "max": float(durations.max()),
        "histogram": _histogram(durations),
        "values": [round(float(d), 3) for d in durations],
    }


def collect_stats(path: Location) -> dict[str, Any]:
    if not is_url(path) and Workdir(Path(path)).manifest.exists():
        return workdir_stats(Path(path))
    if storage.exists(join(path, INDEX)):
        return shards_stats(path)
    raise FileNotFoundError(f"{path} is neither a WORKDIR (manifest.parquet) nor SHARDS (index.json)")


# ---------------------------------------------------------------------------------------------------
# plots and the Markdown report
# ---------------------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def write_plots(stats: dict[str, Any], out: Path) -> dict[str, Path]:
    """durations.png, rejects.png, codebooks.png (sorted code frequencies), agreement.png (NMI matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots: dict[str, Path] = {}
    values = stats["durations"].get("values", [])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(values, bins=min(40, max(5, len(values) // 2)), color="#4c72b0")
    ax.set_xlabel("seconds")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of files
    ax.set_ylabel("segments" if stats["kind"] == "shards" else "files")
    ax.set_title(f"durations: {len(values)} items, {stats['hours']:.2f} h")
    _save(fig, out / "durations.png")
    plots["durations"] = out / "durations.png"

    reasons = [(f"{stage}: {r}", n) for stage, group in stats["rejects"].items() for r, n in group.items()]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * max(1, len(reasons))), dpi=100)
    if reasons:
        ax.barh([r for r, _ in reasons][::-1], [n for _, n in reasons][::-1], color="#c44e52")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("files")
    else:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("rejects by stage and reason")
    _save(fig, out / "rejects.png")
    plots["rejects"] = out / "rejects.png"

    teachers = stats["teachers"]
    if teachers:
        fig, axes = plt.subplots(1, len(teachers), figsize=(4 * len(teachers), 3.2), dpi=100, squeeze=False)
        for ax, (name, facts) in zip(axes[0], teachers.items(), strict=True):
            for q, row in enumerate(facts["codebooks"]):
                if row is not None:
                    freq = np.sort(np.asarray(row["counts"], float))[::-1] / max(1, row["frames"])
                    ax.plot(np.arange(1, len(freq) + 1), freq, label=f"q{q}: ppl {row['perplexity']:.0f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("code rank")
            ax.set_ylabel("frequency")
            ax.set_title(f"{name} ({facts['num_classes']} codes)")
            ax.legend(fontsize=7)
        _save(fig, out / "codebooks.png")
        plots["codebooks"] = out / "codebooks.png"
    if len(teachers) > 1:
        names = list(teachers)
        matrix = np.eye(len(names))
        for pair, metrics in stats["agreement"].items():
            a, b = pair.split("~")
            matrix[names.index(a), names.index(b)] = matrix[names.index(b), names.index(a)] = metrics["nmi"]
        fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 1.2 + 1.0 * len(names)), dpi=100)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w")
        fig.colorbar(image, ax=ax)
        ax.set_title("normalised MI (codebook 0)")
        _save(fig, out / "agreement.png")
        plots["agreement"] = out / "agreement.png"
    return plots


def render_markdown(stats: dict[str, Any], plots: dict[str, Path]) -> str:
    lines = [f"# Dataset and label statistics: {stats['source']}", ""]
    lines += [f"> **Warning:** {warning}\n" for warning in stats.get("warnings", [])]
    unit = "segments" if stats["kind"] == "shards" else "files"
    count = stats.get("segments", stats["files"])
    lines += [
        f"- **{stats['hours']:.3f} h** in **{count} {unit}**"
        + (f" from {stats['files']} source files" if stats["kind"] == "shards" else ""),
        "- splits: " + ", ".join(f"{k} {v}" for k, v in stats["splits"].items()),
    ]
    if "resampled" in stats:
        r = stats["resampled"]
        lines.append(f"- resampled to 24 kHz: {r['files']} files, {r['hours']:.3f} h")
    d = stats["durations"]
    lines += [
        f"- durations: min {d['min']:.2f} s, median {d['median']:.2f} s, mean {d['mean']:.2f} s, "
        f"max {d['max']:.2f} s",
        "",
        "![durations](durations.png)",
        "",
        "| from (s) | to (s) | " + unit + " |",
        "|---:|---:|---:|",
    ]
    for b in d["histogram"]:
        upper = "" if b["to"] is None else f"{b['to']:g}"
        lines.append(f"| {b['from']:g} | {upper} | {b['files']} |")
    lines += ["", "## Rejects", "", "| stage | reason | files |", "|---|---|---:|"]
    rows = [(s, r, n) for s, group in stats["rejects"].items() for r, n in group.items()]
    lines += [f"| {s} | {r} | {n} |" for s, r, n in rows] or ["| (none) | | 0 |"]
    lines += ["", "![rejects](rejects.png)", ""]
    if "dedup" in stats:
        lines += _dedup_markdown(stats["dedup"])
    lines += ["## Codebook usage", ""]
    if stats["teachers"]:
        lines += ["| teacher | codebook | codes | used | entropy (bits) | perplexity | frames |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        for name, facts in stats["teachers"].items():
            for q, row in enumerate(facts["codebooks"]):
                if row is not None:
                    lines.append(
                        f"| {name} | {q} | {facts['num_classes']} | {row['used']} "
                        f"| {row['entropy_bits']:.3f} | {row['perplexity']:.1f} | {row['frames']} |"
                    )
        lines += ["", "![codebooks](codebooks.png)", ""]
    else:
        lines += ["No labels found.", ""]
    if stats["agreement"]:
        lines += ["## Agreement between teachers (codebook 0, frame by frame)", ""]
        lines += ["| pair | MI (bits) | MI/H(a) | MI/H(b) | NMI | purity a given b | frames |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        for pair, m in stats["agreement"].items():
            lines.append(
                f"| {pair.replace('~', ' vs ')} | {m['mutual_information']:.3f} "
                f"| {m['mi_over_entropy_a']:.3f} | {m['mi_over_entropy_b']:.3f} | {m['nmi']:.3f} "
                f"| {m['purity_a_given_b']:.3f} | {m['frames']} |"
            )
        if "agreement" in plots:
            lines += ["", "![agreement](agreement.png)"]
        lines.append("")
    return "\n".join(lines)


def _dedup_markdown(dedup: dict[str, Any]) -> list[str]:
    """The near-duplicate groups `dedup` found: counts, hours removed, a few examples with their scores."""
    lines = [
        "## Near-duplicate recordings",
        "",
        f"{dedup['groups']} group{'' if dedup['groups'] == 1 else 's'} of one recording; "
        f"{dedup['dropped_files']} files dropped "
        f"({dedup['dropped_hours']:.3f} h), one file kept per group"
        + (f"; {dedup['kept_by_keep_list']} more kept by the keep list" if dedup["kept_by_keep_list"] else "")
        + ".",
        "",
    ]
    if dedup["examples"]:
        lines += ["| kept | dropped | overlap (s) | score |", "|---|---|---:|---:|"]
        for group in dedup["examples"]:
            for item in group["dropped"][:3]:
                lines.append(
                    f"| {group['kept']['path']} | {item['path']} | {item['overlap_seconds']:.1f} "
                    f"| {item['score']:.3f} |"
                )
        lines.append("")
    return lines


def default_report_dir(source: Location) -> Path:
    """Where `stats` writes by default: WORKDIR/stats/report, or SHARDS/report for a local shard set; a
    remote SHARDS has none (ValueError: name a local folder)."""
    if is_url(source):
        raise ValueError(f"{source} is remote: give --out, a local folder for the report")
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder")
    if Workdir(source).manifest.exists():
        return Workdir(source.resolve()).report_dir
    return source.resolve() / "report"


def write_report(source: Location, out: Path) -> dict[str, Any]:
    """Collect, then write OUT/stats.json, OUT/report.md and the PNG plots; returns the stats."""
    stats = collect_stats(source)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(stats, out)
    atomic_write_text(out / "report.md", render_markdown(stats, plots))
    stats["outputs"] = {"report": str(out / "report.md"), **{k: str(v) for k, v in plots.items()}}
    atomic_write_json(out / "stats.json", stats)
    return stats
