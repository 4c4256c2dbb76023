"""The `mert-pipe` command as a user runs it: a real subprocess, real files, real exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import typer
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records, iter_rejects
from mert_pipeline.manifests.records import DEFAULT_SEED
from mert_pipeline.pipeline import PipelineConfig
from tests.helpers import REPO


def mert_pipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mert_pipeline", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_corpus(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = np.arange(24000 * 4) / 24000
        sf.write(
            root / f"song {i}.flac", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 24000
        )
    return root


@pytest.mark.parametrize("command", ["manifest", "resample", "tokenize", "run", "demo"])
def test_help_says_what_each_command_reads_and_writes(command: str) -> None:
    result = mert_pipe(command, "--help")
    assert result.returncode == 0
    assert "--executor" in result.stdout and "--workers" in result.stdout
    words = {
        "manifest": ("Reads", "Writes", "rejects.jsonl", "train.tsv", "--ray-address", "--force", "--deep"),
        "resample": ("Reads", "Writes", "audio_24k", "--sample-rate", "--format", "--on-silence", "--force"),
        "tokenize": ("Reads", "Writes", "--teacher", "--codec-checkpoint", "--batch-seconds", "--dtype"),
        "run": (
            "your own music",
            "writes",
            "--teachers",
            "--codec-checkpoint",
            "--shards",
            "--segment-seconds",
        ),
        "demo": ("--tracks",),
    }
    for word in words[command]:
        assert word in result.stdout


def test_top_level_help_lists_commands_and_where_to_start() -> None:
    result = mert_pipe("--help")
    assert result.returncode == 0 and "manifest" in result.stdout and "demo" in result.stdout
    text = " ".join(result.stdout.split())
    start = text.index("Start with")
    assert start < text.index("mert-pipe demo") < text.index("mert-pipe run") < text.index("mert-pipe train")
    assert "torchrun trainer/pretrain.py" in text


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_help_reads_as_words_and_sentences() -> None:
    """No `<bool>` or `<int range>` types, no `{ROOT}` usage, no docstring line breaks mid-sentence."""
    root = typer.main.get_command(app)
    runner = CliRunner()
    seen = 0
    for path, command in [((), root), *_commands(root)]:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert result.exit_code == 0, path
        usage = next(line for line in result.output.splitlines() if "Usage:" in line)
        assert "{" not in usage and not re.search(r"<(bool|int|float|str|path|list)", result.output), path
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph, (path, paragraph)
        seen += 1
    assert seen >= 18
    assert "ROOT..." in runner.invoke(app, ["run", "--help"], terminal_width=200).output


def test_every_seed_defaults_to_one_value() -> None:
    """run and the single commands split, sample and shuffle a corpus alike (the demo's seed is its own)."""
    defaults = {}
    for path, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            if param.name == "seed" and path != ("demo",):
                defaults[" ".join(path)] = param.default
    assert set(defaults) >= {"run", "manifest", "shard", "features", "kmeans fit", "tokenize"}
    assert set(defaults.values()) == {DEFAULT_SEED}
    assert PipelineConfig(roots=("x",), workdir=Path("w")).seed == DEFAULT_SEED


def test_a_folder_without_audio_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = mert_pipe("run", str(tmp_path / "empty"), "--out", str(tmp_path / "w"), "--teachers", "kmeans4")
    assert result.returncode == 2 and "error: no audio found under" in result.stderr
    assert ".flac" in result.stderr and ".wav" in result.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not music")
    result = mert_pipe("manifest", str(tmp_path / "notes"), "--out", str(tmp_path / "w2"))
    assert (
        result.returncode == 2
        and "skipped 1 other files" in result.stderr
        and "--extensions" in result.stderr
    )


def test_an_all_rejected_corpus_is_exit_1_with_the_reasons_and_a_partly_rejected_one_is_not(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.wav").write_bytes(b"RIFF" + b"\x00" * 60)
    (bad / "b.flac").write_bytes(b"fLaC" + b"\x01" * 200)
    result = mert_pipe("manifest", str(bad), "--out", str(tmp_path / "w"))
    assert result.returncode == 1, result.stderr
    assert "error: all 2 audio files were rejected (1 not_audio, 1 decode_error)" in " ".join(
        result.stderr.split()
    )
    small_corpus(bad, n=1)
    assert mert_pipe("manifest", str(bad), "--out", str(tmp_path / "w")).returncode == 0


def test_run_checks_the_codec_before_its_first_stage(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "corpus", n=1)
    missing = tmp_path / "encodec.th"
    result = mert_pipe("run", str(corpus), "--out", str(tmp_path / "w"), "--codec-checkpoint", str(missing))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith(f"error: EnCodec checkpoint {missing}"), lines
    assert not (tmp_path / "w" / "manifest.parquet").exists(), "nothing ran before the check"


def test_missing_root_is_a_one_line_error(tmp_path: Path) -> None:
    result = mert_pipe("manifest", str(tmp_path / "nope"), "--out", str(tmp_path / "w"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: root {tmp_path / 'nope'} does not exist"


def test_unwritable_out_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "a file").write_text("x")
    result = mert_pipe("manifest", str(small_corpus(tmp_path / "m")), "--out", str(tmp_path / "a file" / "w"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot create") and "Not a directory" in lines[0]


def test_bad_option_values_are_one_line_errors(tmp_path: Path) -> None:
    corpus = str(small_corpus(tmp_path / "m"))
    result = mert_pipe("manifest", corpus, "--out", str(tmp_path / "w"), "--executor", "slurm")
    assert (
        result.returncode == 2
        and result.stderr.strip() == "error: --executor must be 'local' or 'ray', not 'slurm'"
    )
    result = mert_pipe("manifest", corpus, "--out", corpus + "/w")
    assert result.returncode == 2 and "inside a root" in result.stderr
    (tmp_path / "m" / "inner").mkdir()
    result = mert_pipe("manifest", corpus, corpus + "/inner", "--out", str(tmp_path / "w"))
    assert result.returncode == 2 and "is inside root" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "error: Missing argument 'ROOT...'. (see mert-pipe manifest --help)"),
        (("/tmp", "--valid-percent", "2"), "error: Invalid value for '--valid-percent'"),
        (("/tmp", "--out", "/tmp/x", "--bogus"), "error: No such option: --bogus"),
    ],
)
def test_click_usage_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    result = mert_pipe("manifest", *args, *(() if "--out" in args else ("--out", "/tmp/never-created")))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_manifest_runs_and_summarises(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "m")
    (corpus / "broken.wav").write_text("not audio")
    result = mert_pipe(
        "manifest", str(corpus), "--out", str(tmp_path / "w"), "--workers", "2", "--files-per-task", "1"
    )
    assert result.returncode == 0, result.stderr
    for word in (
        "manifest summary",
        "files_seen",
        "accepted",
        "rejected.not_audio",
        "audio hours",
        "throughput",
    ):
        assert word in result.stderr
    assert len(list(iter_records(tmp_path / "w/manifest.parquet"))) == 3
    assert [r.reason for r in iter_rejects(tmp_path / "w/rejects.jsonl")] == ["not_audio"]
    stats = json.loads((tmp_path / "w/stats/manifest.json").read_text())
    assert stats["tasks"] == {"total": 4, "done": 4, "skipped": 0, "failed": 0}
    assert stats["summary"]["counts"]["accepted"] == 3


def test_resample_runs_after_manifest_and_refuses_misuse(tmp_path: Path) -> None:
    work = str(tmp_path / "w")
    result = mert_pipe("resample", work)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {work}/manifest.parquet not found: run `mert-pipe manifest ROOT... --out {work}` first"
    )
    assert mert_pipe("manifest", str(small_corpus(tmp_path / "m")), "--out", work).returncode == 0
    for args, message in [
        (("--format", "mp3"), "error: format must be one of ('FLAC', 'WAV'), not 'MP3'"),
        (("--bits", "8"), "error: bits must be 16 or 24, not 8"),
        (("--on-silence", "drop"), "error: on_silence must be one of ('keep', 'reject'), not 'drop'"),
    ]:
        result = mert_pipe("resample", work, *args)
        assert result.returncode == 2 and result.stderr.strip() == message, result.stderr
    result = mert_pipe("resample", work, "--workers", "2")
    assert result.returncode == 0, result.stderr
    for word in ("resample summary", "accepted", "resampled", "copied", "throughput"):
        assert word in result.stderr
    assert len(list((tmp_path / "w/audio_24k").rglob("*.flac"))) == 3


def test_tokenize_misuse_and_missing_weights_are_one_line_errors(tmp_path: Path) -> None:
    work = str(tmp_path / "w")
    result = mert_pipe("tokenize", work)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {work}/audio_24k/manifest.parquet not found: run `mert-pipe resample {work}` first"
    )
    assert mert_pipe("manifest", str(small_corpus(tmp_path / "m", n=1)), "--out", work).returncode == 0
    assert mert_pipe("resample", work).returncode == 0
    for args, message in [
        (("--teacher", "mfcc"), "error: --teacher must be one of rvq, kmeans, bestrq, not 'mfcc'"),
        (("--bandwidth", "5"), "error: --bandwidth must be one of 1.5, 3, 6, 12, 24 kbps, not 5"),
        (("--device", "tpu"), "error: --device must be auto, cpu or cuda, not 'tpu'"),
        (
            ("--codec-checkpoint", str(tmp_path / "nope.pt")),
            f"error: EnCodec checkpoint {tmp_path / 'nope.pt'} does",
        ),
    ]:
        result = mert_pipe("tokenize", work, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr
    # No checkpoint and no internet (as on CI): the error says what to download and where to put it.
    result = mert_pipe("tokenize", work)
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(error) == 1
    assert "encodec_24khz-d7cc33bc.th" in error[0] and "--codec-checkpoint" in error[0]
    assert "hub/checkpoints" in error[0]


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "m")
    holder = "import sys, time; from pathlib import Path; from mert_pipeline.fs import workdir_lock\n"
    holder += "with workdir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "w")], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        result = mert_pipe("manifest", str(corpus), "--out", str(tmp_path / "w"))
        assert result.returncode == 2
        assert (
            result.stderr.strip()
            == f"error: another mert-pipe run (pid {proc.pid}) is using {tmp_path / 'w'}"
        )
    finally:
        proc.kill()
        proc.wait()


def test_demo_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    demo = ("demo", "--out", str(tmp_path / "demo"), "--tracks", "6", "--workers", "2", "--train-steps", "20")
    result = mert_pipe(*demo)
    assert result.returncode == 0, result.stderr
    assert "demo finished" in result.stderr
    # the model part: trained (20 steps), exported, probed against a random init and MFCC, stats report
    assert json.loads((tmp_path / "demo/hf/config.json").read_text())["architectures"] == ["HubertModel"]
    assert (tmp_path / "demo/hf/export.json").exists()
    assert "round trip max |diff|" in " ".join(result.stderr.split())  # rich wraps lines
    probe = json.loads((tmp_path / "demo/probe/probe.json").read_text())["results"]
    assert set(probe) == {"trained", "random init", "MFCC"} and probe["MFCC"]["folds"] == 4
    assert (tmp_path / "demo/probe/probe.png").stat().st_size
    assert (tmp_path / "demo/work/stats/report/codebooks.png").stat().st_size > 5000
    assert "stats_report" in result.stderr
    work = tmp_path / "demo" / "work"
    records = list(iter_records(work / "manifest.parquet"))
    assert len(records) == 6 + 5 + 2  # the tracks, the edge cases a quick probe accepts, two copies
    reasons = sorted(r.reason for r in iter_rejects(work / "rejects.jsonl"))
    assert reasons == ["decode_error", "empty", "extension", "not_audio", "not_audio", "too_short"]
    resampled = list(iter_records(work / "audio_24k/manifest.parquet", record_type=ResampledRecord))
    assert len(resampled) == 6 + 3 and all(r.sampling_rate == 24000 and r.channels == 1 for r in resampled)
    reasons = sorted(r.reason for r in iter_rejects(work / "audio_24k/rejects.jsonl"))
    assert reasons == ["decode_error", "near_duplicate", "near_duplicate", "non_finite"]  # dedup's too
    assert "1 group of one recording; 2 files dropped" in (work / "stats/report/report.md").read_text()
    labels = list(iter_records(work / "labels/rvq/labels.parquet", record_type=LabelRecord))
    assert sorted(r.id for r in labels) == sorted(r.id for r in resampled)
    assert all(r.n_q == 8 and r.frames == -(-r.num_samples // 320) for r in labels)
    assert "TEST CODEC" in result.stderr  # no internet here: the demo says loudly that it is not EnCodec
    index = json.loads((tmp_path / "demo/shards/index.json").read_text())
    assert index["totals"]["all"]["seconds"] == pytest.approx(sum(r.duration for r in resampled))
    assert "no problems" in result.stderr  # the demo ends with a verify of its shards
    shown = " ".join(result.stderr.split())
    assert "train: 20 steps of the tiny model" in shown and "at step 20" in shown  # first and last loss
    assert "192 clips, 4-fold accuracy" in shown and "MFCC mean+std" in shown  # what the verdict rests on
    assert "TEST CODEC" in (work / "stats/report/report.md").read_text()
    assert index["teachers"]["rvq"]["config"]["weights"] == "test"
    again = mert_pipe(*demo)
    assert again.returncode == 0
    assert "train: already trained (20 steps" in " ".join(again.stderr.split())
    stats_files = [work / f"stats/{stage}.json" for stage in ("manifest", "resample", "tokenize_rvq")]
    for path in [*stats_files, tmp_path / "demo/shards/stats/shard.json"]:
        stats = json.loads(path.read_text())
        assert stats["tasks"]["done"] == 0 and stats["tasks"]["skipped"] == stats["tasks"]["total"]


@pytest.mark.ray
def test_ray_executor_started_for_the_run_matches_local(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "m", n=4)
    (corpus / "junk.ogg").write_bytes(b"\x00" * 100)
    local = mert_pipe("manifest", str(corpus), "--out", str(tmp_path / "local"), "--files-per-task", "2")
    ray = mert_pipe(
        "manifest",
        str(corpus),
        "--out",
        str(tmp_path / "ray"),
        "--files-per-task",
        "2",
        "--executor",
        "ray",
        "--workers",
        "2",
    )
    assert local.returncode == 0 and ray.returncode == 0, ray.stderr
    for name in ("manifest.parquet", "rejects.jsonl", "train.tsv", "valid.tsv"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    assert json.loads((tmp_path / "ray/stats/manifest.json").read_text())["executor"] == "ray"


def test_run_makes_shards_of_every_teacher_in_one_command_and_resumes(
    tmp_path: Path, test_codec_file: Path
) -> None:
    corpus = small_corpus(tmp_path / "corpus", n=4)
    (corpus / "junk.wav").write_bytes(b"RIFF" + b"\x00" * 60)
    common = ["--out", str(tmp_path / "work"), "--codec-checkpoint", str(test_codec_file)]
    common += ["--teachers", "rvq,kmeans8", "--valid-percent", "0.25", "--segment-seconds", "2"]
    result = mert_pipe("run", str(corpus), *common, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "run finished" in result.stderr and "no problems" in result.stderr
    index = json.loads((tmp_path / "work/shards/index.json").read_text())
    assert sorted(index["teachers"]) == ["kmeans8", "rvq"]
    assert index["totals"]["all"]["seconds"] == pytest.approx(4 * 4.0)
    run = json.loads((tmp_path / "work/stats/run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == [
        "manifest",
        "resample",
        "dedup",
        "tokenize_rvq",
        "features_mfcc",
        "tokenize_kmeans8",
        "shard",
    ]
    assert run["rejects"] == {"manifest: not_audio": 1}
    again = mert_pipe("run", str(corpus), *common, "--workers", "2")
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "work/stats/run.json").read_text())
    assert all(s["tasks"]["done"] == 0 for s in rerun["stages"]), "a rerun skips every finished task"


@pytest.mark.parametrize(
    ("teachers", "message"),
    [
        ("rvq,kmeans", "error: --teachers takes rvq, kmeansK"),
        ("rvq,rvq", "error: --teachers must name each teacher once"),
        ("mfcc", "error: --teachers takes rvq, kmeansK"),
    ],
)
def test_run_misuse_is_a_one_line_error(tmp_path: Path, teachers: str, message: str) -> None:
    corpus = small_corpus(tmp_path / "corpus", n=1)
    result = mert_pipe("run", str(corpus), "--out", str(tmp_path / "work"), "--teachers", teachers)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr
