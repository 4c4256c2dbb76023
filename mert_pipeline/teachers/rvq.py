"""EnCodec 24 kHz RVQ teacher: exact codes from batched, chunked, streaming encoding.

MERT's acoustic teacher is EnCodec 24 kHz at 6 kbps: 8 codebooks of 1024 entries at 75 Hz (hop 320), one
frame per started hop, ``ceil(num_samples / 320)`` frames per file. ``model.encode`` needs the whole file in
memory at once, and re-encoding chunks with a finite left context is not exact: the SEANet encoder is causal
but its LSTM carries state over the whole history, so codes drift (measured ~99.7% agreement with seconds
of context). This module streams instead, so chunked codes are the whole-file codes:

* every ``SConv1d`` keeps the last ``padding_total`` input samples of its row as a cache and prepends them
  to the next chunk, exactly the samples the whole-file convolution sees at that position;
* at a file's first chunk the cache is the package's own left padding (``pad1d`` in reflect mode,
  including its special case for inputs shorter than the padding);
* at a file's last chunk every strided conv appends the right "extra padding" that whole-file ``encode``
  computes from the file's total length at that layer (``get_extra_padding_for_conv1d``, reflect mode);
* the 2-layer ``SLSTM`` carries its ``(h, c)`` from chunk to chunk (run in float32 even under autocast);
* the residual quantizer is per frame, so it is applied to the streamed embeddings unchanged.

Only the package's modules and weights are called (``SConv1d.conv``, ``SLSTM.lstm``, ``model.quantizer``);
this file only decides what each of them sees. Results match whole-file ``encode`` up to float rounding
(convolution blocking depends on the input length), which flips a code only at near-ties: >= 99.99% per
codebook is required by the tests; measured, float32 codes were identical to whole-file codes on 60 s of
music, on CPU and on an H100.

**Batches.** A step encodes a fixed-shape ``[batch_rows, 1, chunk]`` tensor whose rows are independent
streams: each row has its own caches and LSTM state, resets when a new file starts in it, may end its file
in this step (then its chunk is shorter and zero-filled up to the fixed width), or may sit idle (zeros, state
kept). Every step has the same shape whatever the batch holds and rows never mix, so a file's codes do not
depend on which files share the batch or on its row. The parts whose rounding depends on the number of rows
(GEMMs: CPU BLAS rounds a one-row product differently) run one row at a time with a shape that only depends
on the chunk length: the LSTM (``[chunk_frames, 1, 512]``) and the residual quantizer (``[chunk_frames,
128]``); the convolutions run batched, and measured on CPU their per-row results do not depend on the batch
size either. So codes are also identical across ``batch_rows`` (tested with 1, 2, 3, 5 and 8).
:func:`encode_stream` is the scheduler that packs chunks of many files into such steps (a batch holds
``batch_rows * chunk_seconds`` of audio) and stitches the codes back per file, reading each file lazily so
long files never sit whole in memory.

**Precision.** float32 (the default) is the one to label with. On CUDA, encoding turns TF32 and cuDNN
benchmark mode off for its duration (see ``_strict_float32``); with them, codes were neither exact nor
batch-independent. ``bfloat16`` / ``float16`` autocast (fp16 on CUDA only) run the convolutions in reduced
precision, the LSTM and quantizer in float32; they change many codes (measured against float32 on an H100
with the test codec, per codebook: bf16 97% down to 73% agreement, fp16 99.6% down to 95.5%), and on CUDA a
file's fp16/bf16 codes can depend on the batch. Labels made at different precisions must not be mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from encodec import EncodecModel
from encodec import model as _encodec_model
from encodec.modules.conv import SConv1d, get_extra_padding_for_conv1d, pad1d
from encodec.modules.lstm import SLSTM
from encodec.modules.seanet import SEANetResnetBlock
from encodec.utils import _get_checkpoint_url
from torch import nn

from mert_pipeline.devices import check_device, resolve_device, set_threads, worker_device
from mert_pipeline.fs import sha256_file
from mert_pipeline.grid import HOP, SAMPLE_RATE, num_frames
from mert_pipeline.manifests.records import Reject
from mert_pipeline.teachers import FileToLabel, read_blocks

CODEBOOK_SIZE = 1024
TEACHER_NAME = "encodec_24khz"
# The file name `EncodecModel.encodec_model_24khz` downloads (a local variable there, so repeated here);
# its hex suffix is the sha256 prefix torch.hub checks.
CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
OFFICIAL_SHA256_PREFIX = CHECKPOINT_NAME.rsplit("-", 1)[1].split(".")[0]
# The key under which `demo.test_codec` marks its files, so labels made with them say so everywhere.
TEST_CODEC_MARK = "mert_pipeline_test_codec"
# What made a set of codes, recorded as `weights` in teacher.json, labels.parquet and index.json:
WEIGHTS = {
    "official": "EnCodec 24 kHz as published (MERT's acoustic teacher)",
    "test": "TEST CODEC: the EnCodec architecture with random weights; not MERT's teacher",
    "custom": "a custom EnCodec 24 kHz checkpoint (not the published weights)",
}
BANDWIDTHS: dict[float, int] = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # kbps -> codebooks used
_DOWNLOAD_TIMEOUT_S = 20.0  # socket timeout while torch.hub tries to download, so a dead network fails fast

K = TypeVar("K")


class CodecError(RuntimeError):
    """Base class for codec loading problems, each reported as one actionable line."""


class CodecUnavailable(CodecError):
    """The pretrained EnCodec weights could not be loaded (typically: no internet to download them)."""


class CodecCheckpointError(CodecError):
    """A checkpoint file given by the user is missing, unreadable or not an EnCodec 24 kHz state dict."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    names |= {"float16": torch.float16, "fp16": torch.float16}
    resolved = names.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if resolved == torch.float16 and device.type != "cuda":
        raise ValueError("float16 autocast is only supported on CUDA; use bfloat16 on CPU")
    return resolved


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Autocast for reduced precision; float32 runs the plain model."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _strict_float32(device: torch.device) -> Iterator[None]:
    """Real float32 on CUDA while encoding, whatever the process-wide settings, restored afterwards.

    PyTorch lets cuDNN convolutions use TF32 (10 mantissa bits) by default: measured on an H100 that
    changed 0.2-2% of codes against whole-file encoding and made codes depend on the batch; with TF32 off
    they were identical. cuDNN benchmark mode could pick different algorithms (roundings) run to run.
    """
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, cudnn.benchmark, matmul.allow_tf32)
    cudnn.allow_tf32, cudnn.benchmark, matmul.allow_tf32 = False, False, False
    try:
        yield
    finally:
        cudnn.allow_tf32, cudnn.benchmark, matmul.allow_tf32 = saved


def chunk_samples_for(chunk_seconds: float) -> int:
    """Chunk length in samples: chunk_seconds rounded to whole 320-sample hops (at least one hop)."""
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds}")
    return max(1, round(chunk_seconds * SAMPLE_RATE / HOP)) * HOP


def default_batch_rows(device: str | torch.device) -> int:
    """Rows per step: 1 on CPU, 8 on CUDA.

    Measured with 2 threads on CPU, one 2.5 s row per step ran at ~20x real time and 8 rows at ~12x: a
    row's activations stay in cache, 8 rows' do not, and there is no launch overhead to amortise. On an
    H100, 8 rows of 10 s chunks ran at ~470x real time in total against ~250x for one row.
    """
    return 8 if torch.device(device).type == "cuda" else 1


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Loading the teacher
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherInfo:
    """What produced a set of codes; labels whose config_hash differs must never be mixed."""

    name: str
    bandwidth: float
    n_q: int
    codebook_size: int
    frame_rate: int
    hop: int
    sample_rate: int
    checkpoint_sha256: str
    weights: str  # a key of WEIGHTS: official, test or custom

    @property
    def config_hash(self) -> str:
        """16 hex digits over every field: same teacher, weights and codebook count <=> same hash."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config_hash": self.config_hash}


def checkpoint_url() -> str:
    """URL the encodec package downloads the 24 kHz weights from (its ROOT_URL + checkpoint name)."""
    return _get_checkpoint_url(_encodec_model.ROOT_URL, CHECKPOINT_NAME)


def hub_checkpoint_path() -> Path:
    """Where torch.hub (and so the encodec package) looks for the downloaded 24 kHz checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CHECKPOINT_NAME


def _state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Canonical hash of weights: sorted keys, dtype, shape and raw bytes (independent of file format)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _build_model(pretrained: bool) -> EncodecModel:
    """The package's 24 kHz model; its deprecated weight_norm warning is noise for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        return EncodecModel.encodec_model_24khz(pretrained=pretrained)


def _load_pretrained() -> tuple[EncodecModel, str]:
    url, target = checkpoint_url(), hub_checkpoint_path()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        if not target.is_file():  # fetched here, not by torch.hub, whose "Downloading: ..." line would come
            # first even when the network is down; ours shows a bar only once bytes arrive
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                url, str(target), hash_prefix=OFFICIAL_SHA256_PREFIX, progress=sys.stderr.isatty()
            )
        model = _build_model(pretrained=True)
    except (
        Exception
    ) as exc:  # URLError, timeouts, hash mismatch, corrupt cached file: all mean "get the file"
        raise CodecUnavailable(
            f"EnCodec 24 kHz weights unavailable ({_one_line(exc)}): download {url} and pass "
            f"--codec-checkpoint PATH, or put the file at {target} (torch hub's checkpoint dir, where the "
            "encodec package looks)"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    sha = sha256_file(target) if target.is_file() else _state_dict_sha256(model.state_dict())
    return model, sha


def weights_of(sha256: str, test_mark: bool) -> str:
    """Which weights a checkpoint holds: a test codec's file says so; the published file is known by the
    sha256 prefix in its name (torch.hub checks the same prefix); anything else is custom."""
    if test_mark:
        return "test"
    return "official" if sha256.startswith(OFFICIAL_SHA256_PREFIX) else "custom"


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The checkpoint's weights, and whether it is marked as a test codec."""
    if not path.is_file():
        raise CodecCheckpointError(f"EnCodec checkpoint {path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CodecCheckpointError(f"cannot read EnCodec checkpoint {path}: {_one_line(exc)}") from exc
    test_mark = isinstance(obj, Mapping) and TEST_CODEC_MARK in obj
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a training checkpoint (or a test codec) that wraps the weights
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CodecCheckpointError(f"EnCodec checkpoint {path} does not hold a state dict of tensors")
    return dict(obj), test_mark


def _check_keys(path: Path, state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise CodecCheckpointError(
            f"EnCodec checkpoint {path} is not an EnCodec 24 kHz state dict: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} wrong shapes "
            f"{shapes[:3]}"
        )


def _bake_weight_norm(module: nn.Module) -> None:
    """Compute each weight-normed conv's weight g * v / |v| once, instead of before every forward: the
    same function of the same tensors, so the same bits, without its cost on every streamed chunk (2-3% of
    encoding time on a CPU)."""
    for layer in module.modules():
        if hasattr(layer, "weight_g") and hasattr(layer, "weight_v"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                torch.nn.utils.remove_weight_norm(layer)


def load_codec(
    checkpoint: str | Path | None, bandwidth: float = 6.0, device: str | torch.device = "cpu"
) -> tuple[EncodecModel, TeacherInfo]:
    """EnCodec 24 kHz in eval mode on device, set to bandwidth, plus the facts that identify its codes.

    checkpoint None uses the encodec package's own pretrained loader (torch.hub download or its cache) and
    raises CodecUnavailable, naming the URL and the cache path, when that fails. A path is loaded with
    weights_only=True into the package's architecture, strictly; its teacher hash is the file's sha256.
    """
    if float(bandwidth) not in BANDWIDTHS:
        raise ValueError(f"bandwidth must be one of {sorted(BANDWIDTHS)} kbps, got {bandwidth}")
    dev = resolve_device(device)
    if checkpoint is None:
        model, sha = _load_pretrained()
        weights = "official"  # torch.hub checked the file's hash
    else:
        path = Path(checkpoint)
        state, test_mark = _read_state_dict(path)
        model = _build_model(pretrained=False)
        _check_keys(path, state, model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CodecCheckpointError(f"cannot load EnCodec checkpoint {path}: {_one_line(exc)}") from exc
        sha = sha256_file(path)
        weights = weights_of(sha, test_mark)
    model.set_target_bandwidth(float(bandwidth))
    _bake_weight_norm(model.encoder)
    model.eval().to(dev)
    for param in model.parameters():
        param.requires_grad_(False)
    n_q = model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, model.bandwidth)
    info = TeacherInfo(
        name=TEACHER_NAME,
        bandwidth=float(bandwidth),
        n_q=int(n_q),
        codebook_size=int(model.quantizer.bins),
        frame_rate=int(model.frame_rate),
        hop=int(np.prod(model.encoder.ratios)),
        sample_rate=int(model.sample_rate),
        checkpoint_sha256=sha,
        weights=weights,
    )
    return model, info


# --------------------------------------------------------------------------------------------------
# Streaming encoder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Conv:
    module: SConv1d
    slot: int  # index of this conv's cache in the state lists
    rate: int  # input samples per sample at this layer (cumulative stride before it)
    kernel: int
    stride: int
    padding: int  # padding_total of SConv1d: input samples of history each output needs


@dataclass(frozen=True)
class _Res:
    block: tuple[Any, ...]
    shortcut: Any


@dataclass(frozen=True)
class _Lstm:
    module: SLSTM
    slot: int


@dataclass(frozen=True)
class _Elementwise:
    module: nn.Module


class _Plan:
    """The encoder's layers in order, with the per-conv facts streaming needs; rejects non-streamable ones."""

    def __init__(self, encoder: nn.Module) -> None:
        self.n_convs = 0
        self.n_lstms = 0
        self.rate = 1
        self.min_chunk = 1
        self.ops = tuple(self._walk(layer) for layer in encoder.model)
        self.hop = self.rate

    def _walk(self, layer: nn.Module) -> Any:
        if isinstance(layer, SConv1d):
            return self._conv(layer)
        if isinstance(layer, SEANetResnetBlock):
            block = tuple(self._walk(sub) for sub in layer.block)
            shortcut = self._walk(layer.shortcut)
            return _Res(block, shortcut)
        if isinstance(layer, SLSTM):
            self.n_lstms += 1
            return _Lstm(layer, self.n_lstms - 1)
        if isinstance(layer, nn.ELU | nn.Identity):
            return _Elementwise(layer)
        raise ValueError(f"cannot stream encoder layer {type(layer).__name__}")

    def _conv(self, layer: SConv1d) -> _Conv:
        conv = layer.conv.conv
        kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        padding = (kernel - 1) * dilation - (stride - 1)
        if not layer.causal or layer.conv.norm_type not in ("none", "weight_norm", "spectral_norm"):
            raise ValueError("only causal SConv1d layers without time normalisation can be streamed")
        if stride > 1 and padding < stride - 1:
            raise ValueError("strided conv with less history than its end padding cannot be streamed")
        op = _Conv(layer, self.n_convs, self.rate, kernel, stride, padding)
        self.n_convs += 1
        # A file's first (non-final) chunk must hold padding + 1 samples at every layer for its reflection.
        self.min_chunk = max(self.min_chunk, self.rate * (padding + 1))
        self.rate *= stride
        return op


class StreamingEncoder:
    """Encodes fixed-shape batches of chunks whose rows are independent streams, carrying their state.

    Call :meth:`step` repeatedly with ``[batch_rows, chunk_samples]`` audio and, per row, the number of
    valid samples (chunk_samples unless the row's file ends here; 0 = idle row) and whether the row starts
    a new file and/or ends it in this step. Codes of consecutive steps of one row concatenate to exactly
    what whole-file encoding gives (up to float near-ties).
    """

    def __init__(
        self,
        model: EncodecModel,
        batch_rows: int,
        chunk_samples: int,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        self.model = model
        self.device = _model_device(model)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.plan = _Plan(model.encoder)
        if self.plan.hop != HOP:
            raise ValueError(f"expected an encoder with hop {HOP}, got {self.plan.hop}")
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        if chunk_samples % HOP or chunk_samples < self.plan.min_chunk:
            minimum = -(-self.plan.min_chunk // HOP) * HOP
            raise ValueError(
                f"chunk_samples must be a multiple of {HOP} and >= {minimum}, got {chunk_samples}"
            )
        self.batch_rows = int(batch_rows)
        self.chunk_samples = int(chunk_samples)
        self.n_q = int(model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, model.bandwidth))
        self._caches: list[torch.Tensor | None] = [None] * self.plan.n_convs
        self._lstm: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.plan.n_lstms
        self._open = np.zeros(self.batch_rows, dtype=bool)  # row is in the middle of a file
        self._total = np.zeros(self.batch_rows, dtype=np.int64)  # samples of the row's file so far
        # Per-step row facts, set by step() for the layer functions.
        self._lengths = np.zeros(self.batch_rows, dtype=np.int64)
        self._starts = np.zeros(self.batch_rows, dtype=bool)
        self._ends = np.zeros(self.batch_rows, dtype=bool)
        self._idle = torch.zeros(self.batch_rows, dtype=torch.bool, device=self.device)

    def reset(self) -> None:
        """Forget every row's state (all rows must then start a new file)."""
        self._caches = [None] * self.plan.n_convs
        self._lstm = [None] * self.plan.n_lstms
        self._open[:] = False
        self._total[:] = 0

    def step(
        self,
        audio: np.ndarray | torch.Tensor,
        lengths: Sequence[int],
        starts: Sequence[bool],
        ends: Sequence[bool],
    ) -> list[np.ndarray | None]:
        """Encode one batch; returns per row its int16 codes (n_q, frames) for this chunk, None if idle."""
        self._check_rows(audio, lengths, starts, ends)
        x = torch.as_tensor(audio, dtype=torch.float32).reshape(self.batch_rows, 1, self.chunk_samples)
        x = x.to(self.device, non_blocking=True)
        self._total = np.where(self._starts, 0, self._total) + self._lengths
        self._idle = torch.as_tensor(self._lengths == 0, device=self.device)
        with torch.inference_mode(), _strict_float32(self.device):
            with _autocast(self.device, self.dtype):
                emb = self._run(self.plan.ops, x)
            codes = self._quantize(emb)
        self._open = np.where(self._lengths > 0, ~self._ends, self._open)
        out: list[np.ndarray | None] = []
        for row in range(self.batch_rows):
            n = int(self._lengths[row])
            out.append(codes[row, :, : num_frames(n)].copy() if n else None)
        return out

    def _check_rows(
        self,
        audio: np.ndarray | torch.Tensor,
        lengths: Sequence[int],
        starts: Sequence[bool],
        ends: Sequence[bool],
    ) -> None:
        expected = (self.batch_rows, self.chunk_samples)
        if tuple(audio.shape) not in (expected, (self.batch_rows, 1, self.chunk_samples)):
            raise ValueError(f"audio must have shape {expected}, got {tuple(audio.shape)}")
        if not len(lengths) == len(starts) == len(ends) == self.batch_rows:
            raise ValueError(f"lengths, starts and ends need {self.batch_rows} entries each")
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._starts = np.asarray(starts, dtype=bool)
        self._ends = np.asarray(ends, dtype=bool)
        for row in range(self.batch_rows):
            n, start, end = int(self._lengths[row]), bool(self._starts[row]), bool(self._ends[row])
            if n == 0:
                if start or end:
                    raise ValueError(f"row {row}: an idle row (length 0) cannot start or end a file")
                continue
            if not 0 < n <= self.chunk_samples:
                raise ValueError(f"row {row}: length {n} outside [0, {self.chunk_samples}]")
            if n < self.chunk_samples and not end:
                raise ValueError(
                    f"row {row}: only a file's last chunk may be shorter than {self.chunk_samples}"
                )
            if not start and not self._open[row]:
                raise ValueError(f"row {row}: continues a file but no file is open in it")

    # ---- layers ---------------------------------------------------------------------------------

    def _run(self, ops: Sequence[Any], x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = self._apply(op, x)
        return x

    def _apply(self, op: Any, x: torch.Tensor) -> torch.Tensor:
        if isinstance(op, _Conv):
            return self._conv(op, x)
        if isinstance(op, _Res):
            return self._apply(op.shortcut, x) + self._run(op.block, x)
        if isinstance(op, _Lstm):
            return self._lstm_step(op, x)
        return op.module(x)

    def _conv(self, op: _Conv, x: torch.Tensor) -> torch.Tensor:
        """Causal conv over [cache | chunk], with the file's own left/right padding where it starts/ends."""
        if op.padding == 0 and op.stride == 1:
            return self._call_conv(op, x)  # kernel 1: no history, and whole-file encoding pads nothing either
        width = x.shape[-1]
        cache = self._caches[op.slot]
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], op.padding)
        xin = torch.cat([cache.to(x.dtype), x], dim=-1)
        for row in np.flatnonzero(self._starts | self._ends):
            n = -(-int(self._lengths[row]) // op.rate)  # valid samples of this chunk at this layer
            extra = 0
            if self._ends[row] and op.stride > 1:
                total = -(-int(self._total[row]) // op.rate)  # the file's whole length at this layer
                extra = get_extra_padding_for_conv1d(x.new_empty(0, total), op.kernel, op.stride, op.padding)
            if self._starts[row]:
                padded = pad1d(x[row : row + 1, :, :n], (op.padding, extra), mode=op.module.pad_mode)
            elif extra:
                padded = pad1d(xin[row : row + 1, :, : op.padding + n], (0, extra), mode=op.module.pad_mode)
            else:
                continue
            xin[row, :, : padded.shape[-1]] = padded[0]
            xin[row, :, padded.shape[-1] :] = 0
        new_cache = xin[:, :, width:].clone()
        self._caches[op.slot] = torch.where(self._idle[:, None, None], cache.to(new_cache.dtype), new_cache)
        return self._call_conv(op, xin)

    def _call_conv(self, op: _Conv, x: torch.Tensor) -> torch.Tensor:
        """The package's conv; at frame rate on CUDA without cuDNN, whose float32 heuristics misfire there.

        Measured on an H100 (TF32 off): the last conv (512 -> 128, kernel 7) on a 2.5 s chunk (194 frames)
        took 250 ms with cuDNN for 1-2 rows, 0.1 ms for 4-8 rows, and 0.05 ms with PyTorch's native kernel.
        """
        if self.device.type == "cuda" and op.rate == self.plan.hop:
            with torch.backends.cudnn.flags(enabled=False):
                return op.module.conv(x)
        return op.module.conv(x)

    def _lstm_step(self, op: _Lstm, x: torch.Tensor) -> torch.Tensor:
        """SLSTM with (h, c) carried per row, one row at a time, in float32 even under autocast.

        One row per call gives every row the same [T, 1, C] shape whatever the batch holds (CPU BLAS rounds
        a one-row recurrence differently from a batched one), it is the path whole-file encoding takes, and
        it stays fast when cores are oversubscribed, where a batched CPU LSTM synchronises its threads at
        every time step and slows down 10x or more. Float32: the recurrence is where rounding accumulates
        over a whole file, and oneDNN has no bf16 LSTM on CPUs without native bf16 (it raises instead).
        """
        lstm = op.module.lstm
        seq = x.float().transpose(1, 2)  # [B, T, C]
        if self._lstm[op.slot] is None:
            zeros = seq.new_zeros(lstm.num_layers, x.shape[0], lstm.hidden_size)
            self._lstm[op.slot] = (zeros, zeros.clone())
        h_all, c_all = self._lstm[op.slot]
        out = torch.zeros_like(seq)
        with torch.autocast(self.device.type, enabled=False):
            for row in np.flatnonzero(self._lengths > 0):
                inp = seq[row].unsqueeze(1).contiguous()  # [T, 1, C] as SLSTM feeds it
                if self._starts[row]:
                    h_all[:, row] = 0.0
                    c_all[:, row] = 0.0
                state = (h_all[:, row : row + 1].contiguous(), c_all[:, row : row + 1].contiguous())
                y, (h, c) = lstm(inp, state)
                h_all[:, row] = h[:, 0]
                c_all[:, row] = c[:, 0]
                out[row] = y[:, 0] + inp[:, 0] if op.module.skip else y[:, 0]
        return out.transpose(1, 2)

    def _quantize(self, emb: torch.Tensor) -> np.ndarray:
        """RVQ per row in float32: the same GEMM shape for every row, whatever the batch holds."""
        out = np.zeros((self.batch_rows, self.n_q, emb.shape[-1]), dtype=np.int16)
        for row in np.flatnonzero(self._lengths > 0):
            one = emb[row : row + 1].float().clone()
            codes = self.model.quantizer.encode(one, self.model.frame_rate, self.model.bandwidth)
            out[row] = codes[:, 0].to("cpu", torch.int16).numpy()
        return out


# --------------------------------------------------------------------------------------------------
# Whole-file reference and the scheduler
# --------------------------------------------------------------------------------------------------


def encode_whole(model: EncodecModel, audio: np.ndarray, dtype: str | torch.dtype = "float32") -> np.ndarray:
    """Reference: the package's own ``model.encode`` on the whole file; int16 codes (n_q, frames).

    Holds the whole file (and its activations) in memory. Under bf16 autocast on a CPU without native
    bf16 the package's LSTM raises (oneDNN); the streaming encoder runs its LSTM in float32 instead.
    """
    device = _model_device(model)
    resolved = _resolve_dtype(dtype, device)
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32).reshape(1, 1, -1), device=device)
    with torch.inference_mode(), _strict_float32(device), _autocast(device, resolved):
        frames = model.encode(x)
    return frames[0][0][0].to("cpu", torch.int16).numpy()


class _ChunkReader:
    """Re-blocks a file's sample blocks into chunks, pulling from the reader only as far as needed."""

    def __init__(self, blocks: Iterable[np.ndarray], name: Any) -> None:
        self._blocks = iter(blocks)
        self._name = name
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._done = False

    def _fill(self, n: int) -> None:
        while self._buffered < n and not self._done:
            try:
                block = next(self._blocks)
            except StopIteration:
                self._done = True
                break
            arr = np.asarray(block, dtype=np.float32)
            if arr.ndim != 1:
                raise ValueError(f"{self._name!r}: audio blocks must be 1-D mono, got shape {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{self._name!r}: audio contains NaN or infinite samples")
            if arr.size:
                self._buffer.append(arr)
                self._buffered += arr.size

    def empty(self) -> bool:
        self._fill(1)
        return self._buffered == 0

    def take(self, n: int) -> tuple[np.ndarray, bool]:
        """Up to n samples and whether they are the file's last (one sample of look-ahead decides)."""
        self._fill(n + 1)
        parts: list[np.ndarray] = []
        need = n
        while need and self._buffer:
            head = self._buffer[0]
            if head.size <= need:
                parts.append(self._buffer.pop(0))
                need -= head.size
            else:
                parts.append(head[:need])
                self._buffer[0] = head[need:]
                need = 0
        chunk = np.concatenate(parts) if len(parts) != 1 else parts[0]
        self._buffered -= chunk.size
        return chunk, self._done and self._buffered == 0


@dataclass
class _Slot:
    key: Any
    reader: _ChunkReader
    codes: list[np.ndarray]
    started: bool = False


def encode_stream(
    model: EncodecModel,
    items: Iterable[tuple[K, Iterable[np.ndarray]]],
    chunk_seconds: float = 2.5,
    batch_rows: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
) -> Iterator[tuple[K, np.ndarray]]:
    """Encode many files, each given as (file_id, reader of float32 mono 24 kHz blocks); yield codes per file.

    Chunks of up to batch_rows files are encoded together (a batch of batch_rows * chunk_seconds of
    audio); a row whose file ends takes the next file. Files are yielded as they finish, so the order can
    differ from the input order; each as (file_id, int16 codes of shape (n_q, ceil(samples / 320))). Only
    about one chunk per row is read ahead, so files of any length stream through bounded memory. device
    None keeps the model where it is; otherwise the model is moved there. batch_rows None picks
    ``default_batch_rows`` for the model's device. Codes do not depend on batch_rows or on which files
    share a batch.
    """
    if device is not None:
        model.to(resolve_device(device))
    if batch_rows is None:
        batch_rows = default_batch_rows(_model_device(model))
    encoder = StreamingEncoder(model, batch_rows, chunk_samples_for(chunk_seconds), dtype)
    width = encoder.chunk_samples
    pending = iter(items)
    exhausted = False
    slots: list[_Slot | None] = [None] * batch_rows
    audio = np.zeros((batch_rows, width), dtype=np.float32)
    while True:
        for row in range(batch_rows):
            while slots[row] is None and not exhausted:
                try:
                    key, blocks = next(pending)
                except StopIteration:
                    exhausted = True
                    break
                slot = _Slot(key, _ChunkReader(blocks, key), [])
                if slot.reader.empty():
                    yield key, np.zeros((encoder.n_q, 0), dtype=np.int16)
                else:
                    slots[row] = slot
        if all(slot is None for slot in slots):
            return
        audio[:] = 0.0
        lengths = [0] * batch_rows
        starts = [False] * batch_rows
        ends = [False] * batch_rows
        for row, slot in enumerate(slots):
            if slot is None:
                continue
            chunk, last = slot.reader.take(width)
            audio[row, : chunk.size] = chunk
            lengths[row], starts[row], ends[row] = chunk.size, not slot.started, last
            slot.started = True
        codes = encoder.step(audio, lengths, starts, ends)
        for row, slot in enumerate(slots):
            if slot is None:
                continue
            slot.codes.append(codes[row])  # type: ignore[arg-type]
            if ends[row]:
                slots[row] = None
                yield slot.key, np.concatenate(slot.codes, axis=1)


# --------------------------------------------------------------------------------------------------
# The teacher the tokenize stage runs
# --------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
_MODELS: dict[tuple, Any] = {}  # per process: (checkpoint, bandwidth, device) -> (model, device)


def default_files_per_task(device: str) -> int:
    """On CPU a worker encodes one file at a time, so small tasks keep every worker busy; on a GPU a task
    must hold enough files to fill the batch's rows side by side (64 by default) several times over."""
    return 256 if resolve_device(device).type == "cuda" else 4


@dataclass(frozen=True)
class RvqTeacher:
    """EnCodec 24 kHz residual-VQ codes (MERT's acoustic teacher), exact under chunking (module docstring).

    `resolve()` (driver side) loads the weights once to fail early and records their sha256, which is
    part of the teacher's identity; workers load the same file again, once per process.
    """

    bandwidth: float = 6.0
    checkpoint: str | None = None  # None: the encodec package's own pretrained loader
    checkpoint_sha256: str = ""
    weights: str = ""  # official, test or custom (see WEIGHTS); filled by resolve()
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16 (CUDA)
    chunk_seconds: float | None = None  # streamed chunk (a multiple of 320 samples); None: see chunk_for
    batch_seconds: float | None = None  # audio per batch; None: see batch_rows
    threads: int = 1  # torch intra-op threads of each worker
    gpu_lock_dir: str = ""

    kind: str = TEACHER_NAME
    sampling_rate: int = SAMPLE_RATE
    hop: int = HOP
    num_classes: int = CODEBOOK_SIZE

    def __post_init__(self) -> None:
        if float(self.bandwidth) not in BANDWIDTHS:
            raise ValueError(
                f"--bandwidth must be one of {', '.join(f'{b:g}' for b in BANDWIDTHS)} kbps, "
                f"not {self.bandwidth:g}"
            )
        check_device(self.device)
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, not {self.dtype!r}")

    @property
    def n_q(self) -> int:
        return BANDWIDTHS[float(self.bandwidth)]

    def resolve(self) -> RvqTeacher:
        """Load once here (errors surface before workers start) and fill in the checkpoint hash."""
        _, info = load_codec(self.checkpoint, self.bandwidth, "cpu")
        return replace(self, checkpoint_sha256=info.checkpoint_sha256, weights=info.weights)

    def describe(self) -> dict[str, Any]:
        """What identifies the codes: weights, codebook count, precision (bf16 flips some codes)."""
        return {
            "teacher": self.kind,
            "bandwidth": float(self.bandwidth),
            "n_q": self.n_q,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights": self.weights,
            "dtype": self.dtype,
        }

    def model_device(self) -> str:
        return self.device

    def files_per_task(self) -> int:
        return default_files_per_task(self.device)

    def chunk_for(self, device: str) -> float:
        """Streamed chunk: 2.56 s on CPU (short chunks run fastest there), 10.24 s on GPU (fewer steps)."""
        if self.chunk_seconds is not None:
            return self.chunk_seconds
        return 10.24 if device.startswith("cuda") else 2.56

    def batch_rows(self, device: str) -> int:
        """Rows per batch: one on CPU, where batching does not help; 64 files side by side on GPU."""
        chunk = self.chunk_for(device)
        seconds = self.batch_seconds
        if seconds is None:
            seconds = 64 * chunk if device.startswith("cuda") else chunk
        return max(1, round(seconds / chunk))

    def model(self) -> tuple[Any, str]:
        """This process's model (loaded on first use, then cached) and its device."""
        key = (self.checkpoint, float(self.bandwidth), self.device)
        if key not in _MODELS:
            set_threads(self.threads)
            device = worker_device(self.device, self.gpu_lock_dir)
            model, info = load_codec(self.checkpoint, self.bandwidth, device)
            if self.checkpoint_sha256 and info.checkpoint_sha256 != self.checkpoint_sha256:
                raise RuntimeError(
                    f"EnCodec weights changed during the run (sha256 {info.checkpoint_sha256[:12]}, "
                    f"planned with {self.checkpoint_sha256[:12]}); rerun"
                )
            _MODELS[key] = (model, device)
        return _MODELS[key]

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        if not files:
            return
        model, device = self.model()
        failures: dict[str, Reject] = {}
        by_id = {f.id: f for f in files}
        items = ((f.id, read_blocks(f, failures)) for f in files)
        rows = self.batch_rows(device)
        chunk_seconds = self.chunk_for(device)
        chunk = round(chunk_seconds * self.sampling_rate)
        for file_id, codes in encode_stream(model, items, chunk_seconds, rows, device, self.dtype):
            stats["chunks"] += -(-by_id[file_id].num_samples // chunk)
            failure = failures.pop(file_id, None)
            yield file_id, (failure if failure is not None else codes)
