"""Per-layer embeddings from a trainer checkpoint or an exported Hugging Face directory.

Both load into one `Embedder`: (B, N) 24 kHz audio -> (L + 1, B, T, D) hidden states in the convention of
`hf_export` (the two paths give the same numbers). Long files are cut into equal chunks (default 30 s)
that are batched together; the short tail runs alone, never padded, because the GroupNorm front end makes
padded inference differ from unpadded inference (see docs/training.md, "Use the model").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mert_pipeline.audio import open_audio
from mert_pipeline.devices import resolve_device
from mert_pipeline.grid import RECEPTIVE_FIELD, SAMPLE_RATE
from mert_pipeline.resample import StreamResampler, downmix
from mert_pipeline.storage import Location, as_location, is_url, join, relative, walk_files

RATE = SAMPLE_RATE
MIN_SAMPLES = RECEPTIVE_FIELD  # one frame of the conv front end
BLOCK = 1 << 16


@dataclass
class Embedder:
    model: torch.nn.Module
    kind: str  # "checkpoint" or "hf"
    num_layers: int
    dim: int
    normalize: bool
    device: torch.device
    source: str

    @torch.no_grad()
    def hidden_states(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, N) audio -> (L + 1, B, T, D) float32 on the CPU."""
        from mert_pipeline.hf_export import hf_hidden_states, mert_hidden_states

        audio = audio.to(self.device, torch.float32)
        if self.normalize:  # Wav2Vec2FeatureExtractor's do_normalize: zero mean, unit variance per clip
            audio = (audio - audio.mean(1, keepdim=True)) / torch.sqrt(audio.var(1, keepdim=True) + 1e-7)
        if self.kind == "hf":
            states, _ = hf_hidden_states(self.model, audio)
        else:
            states = mert_hidden_states(self.model, audio)
        return torch.stack(states).float().cpu()


def load_embedder(source: Path, device: str = "auto", random_init: bool = False, seed: int = 0) -> Embedder:
    """A trainer checkpoint (or run folder), an exported HF directory, or the released MERT-v1 (its HF
    directory or fairseq checkpoint, read by trainer.weights without remote code); `random_init` keeps
    the architecture and draws fresh weights (the baseline of the probe). `model_path` decides which."""
    from mert_pipeline.hf_export import CheckpointError, build_encoder, load_checkpoint
    from mert_pipeline.model_path import NotAModel, identify_model

    try:
        found = identify_model(source)
    except NotAModel as exc:
        raise CheckpointError(str(exc)) from exc
    dev = resolve_device(device)
    if found.kind == "hf_export":  # transformers loads it without remote code
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging

        logging.disable_progress_bar()  # a bar per load clutters the command's own output

        if random_init:
            torch.manual_seed(seed)
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(source), local_files_only=True))
        else:
            model = AutoModel.from_pretrained(str(source), local_files_only=True)
        pre = source / "preprocessor_config.json"
        normalize = bool(json.loads(pre.read_text()).get("do_normalize", False)) if pre.exists() else False
        cfg = model.config
        if getattr(cfg, "sampling_rate", RATE) != RATE:
            raise ValueError(f"{source} is a {cfg.sampling_rate} Hz model; embed expects {RATE} Hz")
        return Embedder(
            model.eval().to(dev), "hf", cfg.num_hidden_layers, cfg.hidden_size, normalize, dev, str(source)
        )
    if found.is_trainer_checkpoint:
        cfg, state, meta = load_checkpoint(found.file)
        model = build_encoder(cfg, None if random_init else state, seed=seed).to(dev)
        return Embedder(model, "checkpoint", cfg.num_layers, cfg.embed_dim, False, dev, meta["path"])
    # the released MERT-v1 (HF directory with remote code, or the fairseq checkpoint): read without it
    from mert_pipeline.trainer.model import ModelConfig
    from mert_pipeline.trainer.weights import SHAPE_FIELDS, WeightsError, read_source

    try:
        weights = read_source(found.file, with_state=not random_init)
    except WeightsError as exc:
        raise CheckpointError(str(exc).replace("--init-from ", "")) from exc
    cfg = ModelConfig(**{k: v for k, v in weights.fields.items() if k in SHAPE_FIELDS})
    model = build_encoder(cfg, None if random_init else weights.state, seed=seed).to(dev)
    return Embedder(model, "checkpoint", cfg.num_layers, cfg.embed_dim, False, dev, str(weights.path))


def model_identity(source: Path) -> tuple[Path, str]:
    """(the path `load_embedder` should load, sha256 of what decides the numbers): a trainer checkpoint
    (a run folder resolves to its newest ckpt-*.pt, so a checkpoint saved mid-run changes nothing), a
    fairseq checkpoint, or an HF directory, hashed over its config, weights and preprocessor config."""
    from mert_pipeline.fs import sha256_file
    from mert_pipeline.hf_export import CheckpointError
    from mert_pipeline.model_path import HF_WEIGHTS, NotAModel, identify_model

    try:
        found = identify_model(source)
    except NotAModel as exc:
        raise CheckpointError(str(exc)) from exc
    if found.is_hf:
        names = ("config.json", *HF_WEIGHTS, "preprocessor_config.json")
        text = "".join(f"{n} {sha256_file(source / n)}\n" for n in names if (source / n).exists())
        return source.resolve(), hashlib.sha256(text.encode()).hexdigest()
    path = found.file.resolve()
    return path, sha256_file(path)


def stream_audio(path: Path | str) -> Iterator[np.ndarray]:
    """Decode any file libsndfile reads, block by block: mono float32 blocks at 24 kHz (the project's soxr
    streaming resampler), so memory holds one block, whatever the file's length."""
    with open_audio(path) as handle:
        resampler = StreamResampler(handle.samplerate, RATE)
        mono = np.empty(BLOCK, dtype=np.float32)
        while True:
            block = handle.read(BLOCK, dtype="float32", always_2d=True)
            last = len(block) < BLOCK
            yield resampler.process(downmix(block, mono).copy(), last=last).astype(np.float32, copy=False)
            if last:
                break


def read_audio(path: Path | str) -> np.ndarray:
    """A whole (short) file as `stream_audio` decodes it: the probe's clips."""
    return np.concatenate(list(stream_audio(path))).astype(np.float32, copy=False)


class NonFinite(ValueError):
    """A NaN/Inf sample: every frame's embedding would be NaN. `seconds`: where, at 24 kHz."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"NaN/Inf sample at {seconds:.3f} s (24 kHz)")


class PooledStates:
    """Where a file's hidden states go as they are computed, chunk by chunk: a running frame-weighted sum
    (`mean`; `meanstd` adds the sum of squares, for the probe's std), or one temporary file per layer
    appended to (`none`), so memory holds one batch of chunks whatever the file's length. `write` then
    makes OUT/<id>.npy (pool `mean` or `none`)."""

    def __init__(self, pool: str, scratch: Path) -> None:
        self.pool, self.scratch, self.frames = pool, scratch, 0
        self.total: np.ndarray | None = None  # (layers, D) float64 sum over frames
        self.total_sq: np.ndarray | None = None  # (layers, D) float64 sum of squares over frames
        self.parts: list[Any] = []  # pool none: a binary file per layer
        self.shape: tuple[int, int] | None = None  # (layers, D)

    def add(self, states: torch.Tensor) -> None:
        """States (layers, t, D) of one chunk, in file order."""
        array = states.numpy()
        self.shape = (array.shape[0], array.shape[2])
        self.frames += array.shape[1]
        if self.pool in ("mean", "meanstd"):
            summed = array.sum(axis=1, dtype=np.float64)
            self.total = summed if self.total is None else self.total + summed
            if self.pool == "meanstd":  # only the probe asks: embed's hot path does not square
                squared = np.square(array, dtype=np.float64).sum(axis=1)
                self.total_sq = squared if self.total_sq is None else self.total_sq + squared
            return
        if not self.parts:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.parts = [open(self.scratch / f"layer{i}.f32", "w+b") for i in range(array.shape[0])]  # noqa: SIM115
        for layer, handle in zip(array, self.parts, strict=True):
            handle.write(np.ascontiguousarray(layer, dtype=np.float32).tobytes())

    def mean(self) -> np.ndarray:
        """(layers, D) float32: the frame-weighted mean of every state added (pool `mean` or `meanstd`)."""
        assert self.total is not None
        return (self.total / self.frames).astype(np.float32)

    def std(self) -> np.ndarray:
        """(layers, D) float32: the frame-weighted std of every state added (pool `meanstd`)."""
        assert self.total is not None and self.total_sq is not None
        mean = self.total / self.frames
        return np.sqrt(np.maximum(self.total_sq / self.frames - mean * mean, 0.0)).astype(np.float32)

    def write(self, path: Path) -> list[int]:
        """OUT/<id>.npy (float32): (layers, D) or (layers, T, D); the shape written."""
        from mert_pipeline.fs import atomic_path

        assert self.shape is not None
        layers, dim = self.shape
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            if self.pool == "mean":
                np.save(out, self.mean())
                return [layers, dim]
            header = {"descr": "<f4", "fortran_order": False, "shape": (layers, self.frames, dim)}
            np.lib.format.write_array_header_1_0(out, header)
            for handle in self.parts:
                handle.seek(0)
                while block := handle.read(1 << 24):
                    out.write(block)
        return [layers, self.frames, dim]

    def close(self) -> None:
        for handle in self.parts:
            handle.close()
        for part in self.scratch.glob("layer*.f32") if self.scratch.exists() else []:
            part.unlink()


def embed_stream(
    embedder: Embedder,
    blocks: Iterable[np.ndarray],
    layers: list[int] | None,
    chunk: int,
    batch: int,
    sink: PooledStates,
) -> int:
    """Feed a file's blocks through the model in chunks of `chunk` samples (full ones `batch` at a time,
    then the tail alone when it holds a frame, audio shorter than a frame padded to one), each chunk's
    states to `sink` in file order; returns the samples read. NonFinite at the first NaN/Inf sample."""
    buffer, pending, samples = np.zeros(0, np.float32), [], 0

    def run(group: list[np.ndarray]) -> None:
        states = embedder.hidden_states(torch.from_numpy(np.stack(group)))  # (L + 1, b, T, D)
        if layers is not None:
            states = states[layers]
        for i in range(len(group)):
            sink.add(states[:, i])

    for block in blocks:
        bad = ~np.isfinite(block)
        if bad.any():
            raise NonFinite((samples + int(np.flatnonzero(bad)[0])) / RATE)
        samples += len(block)
        buffer = np.concatenate([buffer, block])
        while len(buffer) >= chunk:
            pending.append(buffer[:chunk])
            buffer = buffer[chunk:]
            if len(pending) == batch:
                run(pending)
                pending = []
    if pending:
        run(pending)
    if samples and (len(buffer) >= MIN_SAMPLES or samples < chunk):
        run([np.pad(buffer, (0, max(0, MIN_SAMPLES - len(buffer))))])
    return samples


class _InMemory:
    """A sink for `embed_stream` that keeps every chunk's states: the whole file's frames in memory."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, states: torch.Tensor) -> None:
        self.parts.append(states)


def embed_array(
    embedder: Embedder, audio: np.ndarray, layers: list[int] | None, pool: str, chunk: int, batch: int
) -> np.ndarray:
    """(layers, D) with pool "mean" (frame-weighted mean over the whole file) or (layers, T, D) with "none"
    (chunks' frames concatenated) of audio in memory, chunked as `embed_stream` chunks a file. Audio shorter
    than one frame is zero-padded to one frame."""
    sink = _InMemory()
    embed_stream(embedder, [audio], layers, chunk, batch, sink)  # type: ignore[arg-type]
    frames = torch.cat(sink.parts, dim=1)
    return (frames.mean(1) if pool == "mean" else frames).numpy()


def parse_layers(text: str, num_layers: int) -> list[int] | None:
    """`all` -> None (every one of the L + 1 states), `L` or `a,b,c` -> those indices (0 = before layer 1)."""
    if text == "all":
        return None
    try:
        picked = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--layers takes all, L or L1,L2,..., not {text!r}") from exc
    bad = [i for i in picked if not 0 <= i <= num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{num_layers}")
    return picked


def list_inputs(source: Location) -> list[tuple[str, Location]]:
    """(id, path) pairs: a manifest.parquet (id, path columns), a fairseq train.tsv or a .txt list of
    paths, an audio file, or a folder (its audio files, recursively, sorted). A URL (s3://bucket/prefix)
    is a folder or one object; paths in a manifest or a list may be URLs too."""
    from mert_pipeline.stages.manifest import DEFAULT_EXTENSIONS

    extensions = {f".{e.lstrip('.')}" for e in DEFAULT_EXTENSIONS}
    if is_url(source):
        url = str(source).rstrip("/")
        found = [item["path"] for item in walk_files(url)]
        if found == [url]:
            return [(Path(url.rsplit("/", 1)[-1]).stem, url)]
        audio = [p for p in found if Path(p).suffix.lower() in extensions]
        return [(str(Path(relative(p, url)).with_suffix("")).replace("/", "__"), p) for p in audio]
    source = Path(source)
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source, columns=["id", "path"]).to_pylist()
        return [(row["id"], as_location(row["path"])) for row in table]
    if source.suffix in (".tsv", ".txt"):
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        if source.suffix == ".tsv" and lines and "\t" not in lines[0]:  # fairseq: root, then relpath<TAB>n
            root = as_location(lines[0])
            relpaths = [line.split("\t")[0] for line in lines[1:]]
            return [(str(Path(r).with_suffix("")).replace("/", "__"), join(root, r)) for r in relpaths]
        listed = [as_location(line.split("\t")[0]) for line in lines]  # relative: from the list's folder
        return [
            (Path(str(p)).stem, p if not isinstance(p, Path) or p.is_absolute() else source.parent / p)
            for p in listed
        ]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        return [(str(p.relative_to(source).with_suffix("")).replace("/", "__"), p) for p in files]
    return [(source.stem, source)]


def embed_files(
    embedder: Embedder,
    inputs: list[tuple[str, Location]],
    out: Path,
    layers: list[int] | None,
    pool: str,
    chunk_seconds: float = 30.0,
    batch: int = 8,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Write OUT/<id>.npy per input (float32); yields (id, {"seconds", "shape"} or {"reject": reason,
    "detail", "path"}). Empty and NaN/Inf audio are rejected; audio shorter than one frame is padded."""
    from mert_pipeline.audio import ProbeFailure
    from mert_pipeline.layout import check_stem

    out.mkdir(parents=True, exist_ok=True)
    chunk = max(MIN_SAMPLES, int(round(chunk_seconds * RATE)))
    for file_id, path in inputs:
        try:
            check_stem(file_id)  # before it names OUT/<id>.npy or a scratch folder
        except ValueError as exc:
            yield file_id, {"reject": "bad_record", "detail": str(exc), "path": str(path)}
            continue
        sink = PooledStates(pool, out / ".work" / "embed" / "scratch" / file_id)
        try:
            samples = embed_stream(embedder, stream_audio(path), layers, chunk, batch, sink)
            if not samples:
                yield file_id, {"reject": "empty", "detail": "no audio frames", "path": str(path)}
                continue
            shape = sink.write(out / f"{file_id}.npy")
        except ProbeFailure as exc:
            yield file_id, {"reject": exc.reason, "detail": exc.detail, "path": str(path)}
            continue
        except NonFinite as exc:  # before the .npy is written: nothing of the file is kept
            yield file_id, {"reject": "non_finite", "detail": str(exc), "path": str(path)}
            continue
        except (OSError, RuntimeError, ValueError) as exc:
            yield file_id, {"reject": "decode_error", "detail": " ".join(str(exc).split()), "path": str(path)}
            continue
        finally:
            sink.close()
        yield file_id, {"seconds": samples / RATE, "shape": shape}
