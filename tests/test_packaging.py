"""Packaging: the wheel installs one top-level name, `mert_pipeline`, beside anything else (a package named
`trainer`, as Coqui TTS installs, included), with the trainer's configs and both commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (a build writes build/ and *.egg-info beside them)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mert_pipeline", "stages", "manifests", "trainer"):
        shutil.copytree(REPO / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    build = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (found,) = out.glob("mert_pipeline-*.whl")
    return found


def test_the_wheel_has_one_top_level_name_and_the_trainers_files(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mert_pipeline"}
    for needed in (
        "mert_pipeline/stages/shard.py",
        "mert_pipeline/manifests/records.py",
        "mert_pipeline/trainer/pretrain.py",
        "mert_pipeline/trainer/configs/tiny.yaml",
        "mert_pipeline/trainer/configs/mert_95m.yaml",
        "mert_pipeline/teachers/rvq.py",
        "mert_pipeline/demo/test_codec.py",
        "mert_pipeline/cli/pipeline.py",
    ):
        assert needed in names, needed
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mert-pipe = mert_pipeline.cli:main" in text
    assert "mert-pretrain = mert_pipeline.trainer.pretrain:main" in text
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if "Requires-Dist" in line
    ]
    torch = [line for line in requires if line.split()[1].startswith(("torch", "torchaudio"))]
    assert torch and not any("==" in line for line in torch), torch  # ranges: a user's CUDA torch stays


def test_installs_beside_a_package_named_trainer(wheel: Path, tmp_path: Path) -> None:
    """The wheel goes into a folder of its own, a package called `trainer` into another; both import."""
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    other = tmp_path / "other" / "trainer"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'coqui'\n")
    code = (
        "import trainer, mert_pipeline, mert_pipeline.trainer.pretrain, mert_pipeline.stages.shard, "
        "mert_pipeline.manifests, mert_pipeline.cli\n"
        "print(trainer.OWNER, mert_pipeline.__file__, mert_pipeline.trainer.pretrain.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(other.parent)])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    owner, package, pretrain = result.stdout.split()
    assert owner == "coqui"
    assert Path(package).is_relative_to(target) and Path(pretrain).is_relative_to(target)
    help_text = subprocess.run(
        [sys.executable, "-m", "mert_pipeline.trainer.pretrain", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert help_text.returncode == 0 and "--shards" in help_text.stdout
