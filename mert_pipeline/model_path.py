"""What a model path is: the one place that decides, from what the path holds, which of the five kinds of
model source it names. Every command that takes a model (`embed`, `probe`, `export hf`, `features --kind
model`, `--init-from` of the trainer and of `mert-pipe train`) asks `identify_model` first.

- `run`: a trainer run folder: `ckpt-*.pt` files (beside the trainer's own `config.json`, its run
  config); its newest checkpoint is the model;
- `checkpoint`: one trainer checkpoint file: a torch pickle of tensors and plain values holding `config`
  and `model`;
- `hf_export`: a Hugging Face directory of `model_type: hubert` (`mert-pipe export hf`), its weights in
  `model.safetensors` or `pytorch_model.bin`;
- `mert_hf`: the released MERT-v1 directory: `config.json` with `model_type: mert_model`, and its weights;
- `fairseq`: a fairseq trainer checkpoint (`MERT-v1-*_fairseq.pt`): a pickle that names fairseq, argparse
  or omegaconf classes, or holds `cfg` or `args` beside `model`.

Why by content and not by one file name: a run folder holds a `config.json` too (the trainer's run
config), so "a folder with config.json is a Hugging Face directory" mistook every run folder for one. A
folder that holds both a Hugging Face model and trainer checkpoints is refused as ambiguous rather than
guessed. Nothing is unpickled here beyond `torch.load(weights_only=True, mmap=True)` of a file whose
globals (read with pickletools, never run) are all torch's own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["run", "checkpoint", "hf_export", "mert_hf", "fairseq"]

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in the order transformers prefers them
HF_MODEL_TYPES = {"hubert": "hf_export", "mert_model": "mert_hf"}
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_FAIRSEQ_GLOBALS = ("fairseq.", "argparse.", "omegaconf.")
LOOKED_FOR = (
    "looked for ckpt-*.pt (a trainer run folder), a trainer checkpoint file, config.json with model_type "
    "hubert or mert_model and its weights (a Hugging Face directory), or a fairseq checkpoint"
)

DESCRIPTIONS: dict[str, str] = {
    "run": "a trainer run folder",
    "checkpoint": "a trainer checkpoint",
    "hf_export": "a Hugging Face HubertModel directory (export hf)",
    "mert_hf": "a MERT-v1 Hugging Face directory",
    "fairseq": "a fairseq checkpoint",
}


class NotAModel(ValueError):
    """A path that is none of the five kinds (or more than one), said in one line that starts with it."""


@dataclass(frozen=True)
class ModelPath:
    """A model source, identified. `file` is what to load: the newest checkpoint of a run folder, the
    checkpoint or fairseq file itself, or the directory of a Hugging Face model."""

    kind: Kind
    path: Path  # as given
    file: Path

    @property
    def is_trainer_checkpoint(self) -> bool:
        return self.kind in ("run", "checkpoint")

    @property
    def is_hf(self) -> bool:
        return self.kind in ("hf_export", "mert_hf")

    def describe(self) -> str:
        return DESCRIPTIONS[self.kind]


def run_checkpoints(directory: Path) -> list[Path]:
    """A run folder's `ckpt-STEP.pt` files, oldest step first (by number, whatever its zero padding)."""
    found = []
    for path in directory.glob("ckpt-*.pt"):
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path.name, path))
    return [path for _, _, path in sorted(found)]


def identify_model(path: str | Path) -> ModelPath:
    """The kind of model source `path` holds (module docstring), or NotAModel naming what was looked for."""
    path = Path(path)
    if not path.exists():
        raise NotAModel(f"{path}: no such file or directory")
    if path.is_dir():
        return _identify_directory(path)
    if path.name == "config.json" or path.name in HF_WEIGHTS:
        raise NotAModel(f"{path}: pass the folder that holds it ({path.parent}), not one of its files")
    return ModelPath(_pickle_kind(path), path, path)


def _identify_directory(directory: Path) -> ModelPath:
    checkpoints = run_checkpoints(directory)
    hf_kind, hf_problem = _hf_kind(directory)
    if checkpoints and hf_kind:
        weights = next(n for n in HF_WEIGHTS if (directory / n).exists())
        raise NotAModel(
            f"{directory}: holds both a Hugging Face model (config.json, {weights}) and trainer checkpoints "
            f"({checkpoints[-1].name}): pass {checkpoints[-1]} for the checkpoint, or keep the two in "
            "separate folders"
        )
    if checkpoints:
        return ModelPath("run", directory, checkpoints[-1])
    if hf_kind:
        return ModelPath(hf_kind, directory, directory)
    if hf_problem:
        raise NotAModel(f"{directory}: {hf_problem}")
    raise NotAModel(f"{directory}: not a model: {LOOKED_FOR}")


def _hf_kind(directory: Path) -> tuple[Kind | None, str]:
    """(kind, "") for a Hugging Face model directory; (None, why) when config.json says something else."""
    config = directory / "config.json"
    if not config.is_file():
        return None, ""
    try:
        values = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"config.json is not JSON ({' '.join(str(exc).split())[:120]}); {LOOKED_FOR}"
    if not isinstance(values, dict):
        return None, f"config.json is not a JSON object; {LOOKED_FOR}"
    model_type = values.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        if {"model", "train"} <= set(values):
            return None, "a trainer run folder with no checkpoint yet (no ckpt-*.pt)"
        return None, f"config.json has model_type {model_type!r}, not hubert or mert_model; {LOOKED_FOR}"
    if not any((directory / n).is_file() for n in HF_WEIGHTS):
        return None, f"config.json says {model_type} but neither {' nor '.join(HF_WEIGHTS)} is there"
    return HF_MODEL_TYPES[model_type], ""  # type: ignore[return-value]


def _pickle_kind(path: Path) -> Kind:
    """`checkpoint` or `fairseq`, from the pickle's globals and, when they are all torch's, its keys."""
    import zipfile

    from mert_pipeline.trainer.fairseq_checkpoint import scan_globals

    try:
        zipped = zipfile.is_zipfile(path)
        with open(path, "rb") as handle:
            pickled = handle.read(1) == b"\x80"  # a pickle's PROTO opcode: torch's legacy format
    except OSError as exc:
        raise NotAModel(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not (zipped or pickled):
        raise NotAModel(f"{path}: not a torch checkpoint file; {LOOKED_FOR}")
    try:
        names = scan_globals(path)
    except (OSError, ValueError) as exc:
        raise NotAModel(f"{path}: {' '.join(str(exc).split())[:200]}") from exc
    if any(name.startswith(_FAIRSEQ_GLOBALS) for name in names):
        return "fairseq"
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NotAModel(f"{path}: not a torch checkpoint ({first[:160]}); {LOOKED_FOR}") from exc
    keys = set(state) if isinstance(state, dict) else set()
    if {"config", "model"} <= keys:
        return "checkpoint"
    if "model" in keys and keys & {"cfg", "args"}:
        return "fairseq"
    raise NotAModel(f"{path}: a torch file with neither config+model nor cfg+model; {LOOKED_FOR}")
