"""Features from layer L of a trained MERT checkpoint (HuBERT iteration 2), on the teachers' 75 Hz grid.

**Layers.** Layer 0 is the transformer's input (the projected conv features after the positional conv
embedding, and for post-LN models the encoder LayerNorm); layer i in 1..N is transformer layer i's output,
and for pre-LN models layer N is after the final LayerNorm. This is `hf_export`'s convention, i.e.
transformers' `hidden_states[L]` of the exported model. The forward stops after layer L.

**Frames: exactly ceil(n / 320) per file.** The conv front end makes floor((m - 400) / 320) + 1 frames of m
samples and its frame t covers samples [320 t, 320 t + 400), the grid the trainer aligned with the labels
(trainer/model.py). So the waveform is right-padded with zeros to 320 ceil(n / 320) + 80 samples: frame i
still starts at sample 320 i (as in training), and the trailing partial hop gets the frame the other teachers
give it. No left padding: shifting the grid by 40 samples to centre frames on 320 i + 160 (the MFCC centre)
would move the model off the grid it was trained on.

**Long files: windows of the checkpoint's training crop** (`crop_samples`, 5 s for MERT; a multiple of 320).
Window j makes frames [j K, j K + K) with K = crop_samples / 320 from samples [320 j K, 320 (j + 1) K + 80):
the 80 samples of look-ahead are real audio, and zeros appear only past the end of the file. Features are
therefore per-window context (as fairseq's HuBERT dump script's max_chunk), memory stays bounded whatever
the file length, and attention never sees more context than training did. Full windows run in batches of
`batch_windows`; the last, shorter window runs alone. Zero padding at the file end enters the front end's
GroupNorm statistics of that last window only.

The model is loaded once per worker process (cached), in eval mode (no dropout, layerdrop, masking or
noise), fp32, on the GPU when one is present (one per local worker, see `devices.claim_gpu`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mert_pipeline.devices import worker_device
from mert_pipeline.grid import HOP, RECEPTIVE_FIELD, SAMPLE_RATE, num_frames

PAD = RECEPTIVE_FIELD - HOP  # 80: what a conv frame sees past its hop
_ENCODERS: dict[tuple, tuple[torch.nn.Module, torch.device]] = {}  # per process: (path, sha256, device)


class _Reached(Exception):
    """Raised by a hook to stop the forward once the wanted layer has been computed."""


@torch.no_grad()
def layer_output(model: torch.nn.Module, audio: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, N) audio -> (B, T, D) hidden state `layer` (module docstring), running the model's own
    `encode` only up to that layer; equal to `hf_export.mert_hidden_states(model, audio)[layer]`."""
    layers = model.encoder.layers
    if layer == len(layers):
        return model.encode(audio, None)[0]
    captured: list[torch.Tensor] = []

    def grab(value: torch.Tensor) -> None:
        captured.append(value)
        raise _Reached

    if layer == 0:
        hook = layers[0].register_forward_pre_hook(lambda m, args: grab(args[0]))
    else:
        hook = layers[layer - 1].register_forward_hook(lambda m, args, out: grab(out))
    try:
        model.encode(audio, None)
    except _Reached:
        pass
    finally:
        hook.remove()
    return captured[0]


def padded_length(num_samples: int) -> int:
    """Samples fed to the front end for `num_samples` of audio: ceil(n / 320) frames exactly."""
    return num_frames(num_samples) * HOP + PAD


@dataclass(frozen=True)
class ModelFeatures:
    """A streaming extractor (`stream`, `dim`, `config` like `features.MFCC`) of layer-`layer` states.

    Build it with `from_checkpoint` on the driver: that reads the checkpoint's config and sha256 once;
    workers then load the weights once per process and refuse a file whose sha256 changed.
    """

    checkpoint: str
    layer: int
    checkpoint_sha256: str
    dim: int
    num_layers: int
    window_samples: int
    step: int = 0
    batch_windows: int = 4
    device: str = "auto"  # auto | cpu | cuda
    gpu_lock_dir: str = ""

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, layer: int, **kw: Any) -> ModelFeatures:
        """Resolve a source once: one of our checkpoints (or a run folder: its newest), a MERT-v1 or
        `export hf` directory, or the official fairseq checkpoint (`trainer.weights`). ValueError (one
        line) if unusable. The window is our checkpoint's training crop, else MERT's 5 s."""
        from mert_pipeline.fs import sha256_file
        from mert_pipeline.hf_export import CheckpointError
        from mert_pipeline.model_path import NotAModel, identify_model
        from mert_pipeline.trainer.weights import WeightsError, read_source

        try:  # a run folder is its newest checkpoint, so a checkpoint saved later changes nothing here
            path = identify_model(checkpoint).file.resolve()
        except NotAModel as exc:
            raise CheckpointError(f"--checkpoint {exc}") from exc
        try:  # shapes only: the workers load the weights, and check this hash of them
            source = read_source(path, with_state=False)
        except WeightsError as exc:
            raise CheckpointError(str(exc).replace("--init-from ", "--checkpoint ")) from exc
        num_layers, dim = source.fields["num_layers"], source.fields["embed_dim"]
        if not 0 <= layer <= num_layers:
            raise ValueError(f"--layer must be in 0..{num_layers} for this checkpoint, not {layer}")
        crop, step = 5 * SAMPLE_RATE, 0
        if source.kind == "checkpoint":  # the training crop and step, read lazily (mmap) from the same file
            try:
                saved = torch.load(path, weights_only=True, mmap=True)
                crop = int(saved["config"].get("train", {}).get("crop_samples", crop))
                step = int(saved.get("step", 0))
            except (RuntimeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path}: cannot read its training config: {exc}") from exc
        if crop < HOP or crop % HOP:
            raise CheckpointError(f"{path}: crop_samples {crop} is not a positive multiple of {HOP}")
        return cls(
            checkpoint=str(source.path if source.kind == "checkpoint" else path),
            layer=layer,
            checkpoint_sha256=source.sha256 or sha256_file(source.path),
            dim=dim,
            num_layers=num_layers,
            window_samples=crop,
            step=step,
            **kw,
        )

    def config(self) -> dict[str, Any]:
        """What decides the features' values (not the checkpoint's path or the device)."""
        return {
            "kind": "model",
            "checkpoint_sha256": self.checkpoint_sha256,
            "step": self.step,
            "layer": self.layer,
            "num_layers": self.num_layers,
            "dim": self.dim,
            "sample_rate": SAMPLE_RATE,
            "hop": HOP,
            "window_samples": self.window_samples,
            "batch_windows": self.batch_windows,
            "dtype": "float32",
            "alignment": "frame i from samples [320 i, 320 i + 400), zeros past the end, ceil(n/hop) frames",
        }

    def model(self) -> tuple[torch.nn.Module, torch.device]:
        """This process's encoder (loaded on first use, then cached) and its device."""
        from mert_pipeline.trainer.weights import load_encoder

        key = (self.checkpoint, self.checkpoint_sha256, self.device)
        if key not in _ENCODERS:
            model, source = load_encoder(self.checkpoint)
            if source.sha256 != self.checkpoint_sha256:
                raise RuntimeError(f"{self.checkpoint} changed during the run (sha256 differs); rerun")
            device = self._device()
            _ENCODERS[key] = (model.to(device).eval(), device)
        return _ENCODERS[key]

    def _device(self) -> torch.device:
        return torch.device(worker_device(self.device, self.gpu_lock_dir))

    def windows(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The padded input of each window (module docstring), streamed from one file's blocks."""
        span = self.window_samples
        buf = np.zeros(0, np.float32)
        for block in blocks:
            buf = np.concatenate([buf, np.asarray(block, np.float32)])
            while len(buf) >= span + PAD:
                yield buf[: span + PAD]
                buf = buf[span:]
        if len(buf):
            yield np.pad(buf, (0, padded_length(len(buf)) - len(buf)))

    def _run(self, batch: list[np.ndarray], every_layer: bool = False) -> Iterator[np.ndarray]:
        model, device = self.model()
        audio = torch.from_numpy(np.stack(batch)).to(device)
        if every_layer:  # one forward, all L + 1 states: (B, L + 1, T, D)
            from mert_pipeline.hf_export import mert_hidden_states

            states = torch.stack(mert_hidden_states(model, audio), 1).float().cpu().numpy()
            expected: tuple[int, ...] = (
                len(batch),
                self.num_layers + 1,
                (len(batch[0]) - PAD) // HOP,
                self.dim,
            )
        else:
            states = layer_output(model, audio, self.layer).float().cpu().numpy()
            expected = (len(batch), (len(batch[0]) - PAD) // HOP, self.dim)
        if states.shape != expected:
            raise RuntimeError(f"layer output {states.shape}, expected {expected}")
        yield from states

    def stream(self, blocks: Iterable[np.ndarray], every_layer: bool = False) -> Iterator[np.ndarray]:
        """(frames, dim) float32 blocks, one per window, ceil(n / 320) frames in all; with `every_layer`,
        (L + 1, frames, dim) blocks of every layer from one forward (what choosing a layer needs)."""
        pending: list[np.ndarray] = []
        for window in self.windows(blocks):
            if pending and len(window) != len(pending[0]):
                yield from self._run(pending, every_layer)
                pending = []
            pending.append(window)
            if len(pending) == self.batch_windows:
                yield from self._run(pending, every_layer)
                pending = []
        if pending:
            yield from self._run(pending, every_layer)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """Features (ceil(n / 320), dim) of a whole mono 24 kHz file."""
        parts = list(self.stream([np.asarray(waveform, np.float32)]))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
