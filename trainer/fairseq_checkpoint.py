"""Read the official MERT-v1 fairseq checkpoints (`MERT-v1-95M_fairseq.pt`, `MERT-v1-330M_fairseq.pt`)
into this trainer's names, without fairseq and without running any code from the pickle.

Why this is careful: the files are fairseq trainer pickles (`args`, `cfg`, `model`, `optimizer_history`,
`extra_state`, `task_state` with fairseq `Dictionary` objects), and `torch.load(weights_only=False)` on a
downloaded pickle runs whatever it names. So loading is `weights_only=True` with a short allow-list of
inert stand-ins registered under fairseq's class paths (torch's weights-only unpickler looks globals up by
`__module__ + "." + __qualname__`, never by importing them). Before torch reads anything, the pickle is
scanned with `pickletools` (which parses and runs nothing): a file that names any other global
(`posix.system`, an unknown class) is refused with a one-line `ValueError` naming it.

Key mapping (fairseq v0.12.2 `fairseq/models/wav2vec/wav2vec2.py` and yizhilll/MERT
`mert_fairseq/models/mert/mert_model.py`) onto the transformers-style names of `model.MERT`:

    feature_extractor.conv_layers.N.0.weight     -> feature_extractor.conv_layers.N.conv.weight
    feature_extractor.conv_layers.0.2.*          -> ...conv_layers.0.layer_norm.* (extractor_mode default:
                                                    the GroupNorm, third in the block)
    feature_extractor.conv_layers.N.2.1.*        -> ...conv_layers.N.layer_norm.* (extractor_mode layer_norm:
                                                    Sequential(TransposeLast, Fp32LayerNorm, TransposeLast))
    post_extract_proj                            -> feature_projection.projection
    layer_norm (top level, on the conv features) -> feature_projection.layer_norm
    mask_emb                                     -> masked_spec_embed
    encoder.pos_conv.0.{bias,weight_g,weight_v}  -> encoder.pos_conv_embed.conv.{bias,
                                                    parametrizations.weight.original0, ...original1}
    encoder.layer_norm                           -> encoder.layer_norm
    encoder.layers.N.self_attn.{q,k,v,out}_proj  -> encoder.layers.N.attention.{q,k,v,out}_proj
    encoder.layers.N.self_attn_layer_norm        -> encoder.layers.N.layer_norm
    encoder.layers.N.fc1                         -> encoder.layers.N.feed_forward.intermediate_dense
    encoder.layers.N.fc2                         -> encoder.layers.N.feed_forward.output_dense
    encoder.layers.N.final_layer_norm            -> encoder.layers.N.final_layer_norm
    final_proj (or final_projs.N)                -> final_proj (a tied projection is tiled once per codebook)
    label_embs_concat                            -> label_embs_concat, each label's special rows first,
                                                    then its codes in code order (all rows kept)
    encoder_cqt_model.fc                         -> cqt_head

Anything else is listed in `dropped` with the reason (for the released configs: the CQT target's nnAudio
kernel buffers, `encoder_cqt_model.spec_layer.*`), and config options our model cannot reproduce are listed
in `warnings` (none, for the options the two released yaml configs set).
"""

from __future__ import annotations

import argparse
import ast
import io
import pickle
import pickletools
import re
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mert_pipeline.trainer.model import ModelConfig

__all__ = [
    "FairseqCheckpoint",
    "codebooks_from_labels",
    "load_fairseq_checkpoint",
    "scan_globals",
]


@dataclass
class FairseqCheckpoint:
    """What a fairseq MERT checkpoint holds, in this trainer's terms.

    state: our parameter names -> tensors, dtypes as stored (an fp16 run may store fp16).
    model_fields: ModelConfig field values derived from the checkpoint's cfg.
    label_classes: (label name, classes without fairseq's 4 special symbols), in head order.
    heads: the training heads found ("final_proj", "label_embs_concat", "cqt_head") and how they were mapped.
    dropped: (fairseq key, why it has no place in our state), for every key not mapped.
    warnings: cfg options our model cannot reproduce, and fallbacks taken (defaults, guessed label rows).
    """

    state: dict[str, torch.Tensor]
    model_fields: dict[str, Any]
    label_classes: list[tuple[str, int]]
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# safe loading: inert stand-ins under fairseq's class paths, a pickletools pre-scan, weights_only=True
# ---------------------------------------------------------------------------------------------------


class _Inert:
    """Base of the stand-ins: the unpickler only fills `__dict__`; no fairseq code exists or runs."""

    def __repr__(self) -> str:
        return f"<stand-in {type(self).__module__}.{type(self).__qualname__} {sorted(vars(self))}>"


def _pickled_as(path: str) -> Callable[[type], type]:
    """Give a stand-in the class path the pickle names, which is what torch's allow-list matches."""
    module, _, name = path.rpartition(".")

    def rename(cls: type) -> type:
        cls.__module__, cls.__name__, cls.__qualname__ = module, name, name
        return cls

    return rename


@_pickled_as("fairseq.data.dictionary.Dictionary")
class FairseqDictionaryStub(_Inert):
    """task_state["dictionaries"]: symbols, indices, nspecial of each label set."""


@_pickled_as("fairseq.logging.meters.Meter")
class _MeterStub(_Inert):
    """fairseq meters; fairseq 0.12 pickles their state dicts, older trainers may pickle the objects."""


@_pickled_as("fairseq.logging.meters.AverageMeter")
class _AverageMeterStub(_Inert):
    """Stand-in for fairseq.logging.meters.AverageMeter."""


@_pickled_as("fairseq.logging.meters.SumMeter")
class _SumMeterStub(_Inert):
    """Stand-in for fairseq.logging.meters.SumMeter."""


@_pickled_as("fairseq.logging.meters.TimeMeter")
class _TimeMeterStub(_Inert):
    """Stand-in for fairseq.logging.meters.TimeMeter."""


@_pickled_as("fairseq.logging.meters.StopwatchMeter")
class _StopwatchMeterStub(_Inert):
    """Stand-in for fairseq.logging.meters.StopwatchMeter."""


_NUMERIC_KINDS = "biufc"  # numpy scalars we rebuild: bool, int, uint, float, complex (never object)


def _numpy_scalar(dtype: object, data: object = None) -> np.generic:
    """numpy scalars (a val_loss or lr-scheduler `best` may be np.float64) rebuilt from their raw bytes,
    only for numeric dtypes, without calling numpy's own unpickling hook."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS and isinstance(data, bytes)):
        raise pickle.UnpicklingError(f"refusing numpy scalar of dtype {dtype!r}")
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype} has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype)[0].copy()


def _numpy_scalar_v1(dtype: object, data: object = None) -> np.generic:
    return _numpy_scalar(dtype, data)


def _numpy_scalar_v2(dtype: object, data: object = None) -> np.generic:
    return _numpy_scalar(dtype, data)


# numpy < 2 pickles the scalar hook as numpy.core.multiarray.scalar, numpy >= 2 as numpy._core.multiarray
_numpy_scalar_v1.__module__, _numpy_scalar_v1.__qualname__ = "numpy.core.multiarray", "scalar"
_numpy_scalar_v2.__module__, _numpy_scalar_v2.__qualname__ = "numpy._core.multiarray", "scalar"

# BUILD on a dtype checks the dtype's runtime class (numpy.dtypes.Float64DType, ...): numeric ones only
_NUMPY_DTYPE_CLASSES = sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)

_STAND_INS: list[Any] = [
    FairseqDictionaryStub,
    _MeterStub,
    _AverageMeterStub,
    _SumMeterStub,
    _TimeMeterStub,
    _StopwatchMeterStub,
    argparse.Namespace,  # `args` of pre-hydra fairseq checkpoints: a plain attribute bag
    np.dtype,
    *_NUMPY_DTYPE_CLASSES,
    _numpy_scalar_v1,
    _numpy_scalar_v2,
]


def _path_of(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


_OUR_GLOBALS = {_path_of(obj) for obj in _STAND_INS}


def _torch_default_globals() -> set[str] | None:
    """The globals torch's weights-only unpickler allows by itself (tensor rebuilds, storages, dtypes,
    OrderedDict); None when this torch does not expose them, and then torch itself decides on `torch.*`."""
    try:
        from torch import _weights_only_unpickler as wo

        return set(wo._get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return None


def scan_globals(path: Path) -> list[str]:
    """Every global the checkpoint's pickles name, read with pickletools.genops: parsing, never running.
    The zip format keeps its pickle in `*/data.pkl`; the legacy format is several pickles in a row, then
    raw storage bytes, so its first five pickles are scanned."""
    found: list[str] = []

    def scan(stream: io.IOBase) -> None:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                module, name = str(arg).split(" ", 1)
                if (module, name) in NAME_MAPPING:  # python 2 names, mapped as torch's unpickler maps them
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.append(f"{module}.{name}")
            elif op.name in ("STACK_GLOBAL", "OBJ"):  # protocol 4 / 1 class references torch cannot read
                found.append(f"<pickle opcode {op.name}>")

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            if not names:
                raise ValueError(f"{path}: a zip file without data.pkl, not a torch checkpoint")
            for name in names:
                try:
                    scan(io.BytesIO(archive.read(name)))
                except ValueError as err:
                    raise ValueError(f"{path}: unreadable pickle in the checkpoint ({err})") from None
        return found
    with open(path, "rb") as stream:
        for _ in range(5):
            try:
                scan(stream)
            except ValueError:  # the storage bytes after the last pickle, or not a pickle at all
                break
    return found


def _one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(text).__name__


def _safe_load(path: Path) -> Any:
    """torch.load(weights_only=True) with the stand-ins allowed, after refusing any other global."""
    if not hasattr(torch.serialization, "safe_globals"):  # pragma: no cover - torch < 2.5
        raise ValueError(
            "reading fairseq checkpoints safely needs torch >= 2.5 (torch.serialization.safe_globals)"
        )
    torch_globals = _torch_default_globals()
    for name in scan_globals(path):
        if name in _OUR_GLOBALS:
            continue
        if torch_globals is not None and name in torch_globals:
            continue
        if torch_globals is None and name.startswith("torch."):
            continue  # torch's own unpickler checks these
        raise ValueError(
            f"{path}: refusing to unpickle global {name}: not a tensor type nor one of the fairseq "
            "checkpoint classes this loader allows (nothing was run)"
        )
    already = set(torch.serialization.get_safe_globals())
    allow = [obj for obj in _STAND_INS if obj not in already]  # leave a caller's own registrations alone
    try:
        with torch.serialization.safe_globals(allow):
            # mmap: the optimizer's moments (twice the weights) stay on disk; only the tensors used are read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any failure becomes one line naming the cause
        message = str(err)
        named = re.search(r"GLOBAL (\S+)", message)
        if named:
            raise ValueError(
                f"{path}: refusing to unpickle global {named.group(1)} (nothing was run)"
            ) from None
        weights_only = re.search(r"WeightsUnpickler error: (.+)", message)
        reason = weights_only.group(1) if weights_only else _one_line(message)
        raise ValueError(f"{path}: cannot read as a torch checkpoint: {_one_line(reason)}") from None


# ---------------------------------------------------------------------------------------------------
# the checkpoint's config -> ModelConfig fields
# ---------------------------------------------------------------------------------------------------

# MERTConfig (mert_model.py) and HubertPretrainingConfig defaults, used only where a cfg lacks a key
_MODEL_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_type": "transformer",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "final_dim": 0,
    "untie_final_proj": False,
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "logit_temp": 0.1,
    "feature_grad_mult": 1.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "mask_length": 10,
    "mask_prob": 0.65,
    "audio_cqt_loss_m": False,
    "audio_cqt_bins": 84,
    "mixture_prob": -1.0,
    "inbatch_noise_augment_len_range": "[8000, 24000]",
    "inbatch_noise_augment_number_range": "[1, 3]",
    "inbatch_noise_augment_volume": 1.0,
    "attention_relax": -1.0,
}
_TASK_DEFAULTS: dict[str, Any] = {"sample_rate": 16000}
_CQT_FMIN = 32.7  # hard-coded in MERT's model_cqt_pred (bins per octave = audio_cqt_bins // 7)

# (cfg key, value that changes the architecture or the training, what our model does instead)
_UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("deepnorm", bool, "DeepNorm residual scaling: our encoder layers add residuals unscaled"),
    ("subln", bool, "SubLN ffn_layernorm: our encoder layers have none"),
    ("feature_extractor_cqt", bool, "CQT input features: our projection takes the conv features only"),
    ("do_cnn_feat_stable_layernorm", bool, "non-affine feature/projection layer norms: ours are affine"),
    ("wav_normalize", bool, "waveform layer norm before the conv front end: ours has none"),
    ("conv_bias", bool, "conv biases in the front end: our convs have none"),
    ("layer_type", lambda v: v != "transformer", "a non-transformer encoder layer"),
    ("activation_fn", lambda v: v != "gelu", "an activation other than GELU"),
    ("audio_extract_type", lambda v: v not in (None, "w2v_conv"), "a front end other than the w2v conv"),
    ("pos_conv_depth", lambda v: v is not None and int(v) > 1, "a multi-layer positional conv"),
    ("conv_pos_batch_norm", bool, "a batch-normed positional conv"),
    ("target_glu", bool, "a GLU on the targets"),
    ("learnable_temp", bool, "learnable logit temperatures: ours is fixed"),
    ("random_codebook", lambda v: v is not None and int(v) > 0, "random codebook subsets per step"),
    ("audio_mel_loss_m", bool, "a mel reconstruction loss: ours has none"),
    ("mask_selection", lambda v: v not in (None, "static"), "non-static span lengths"),
    ("no_mask_overlap", bool, "non-overlapping spans: ours overlap"),
    ("mask_channel_prob", lambda v: v is not None and float(v) > 0, "channel masking: ours has none"),
    ("mask_dynamic_prob_step", lambda v: v not in (None, "[]"), "a mask_prob schedule: ours is fixed"),
    ("mask_dynamic_len_step", lambda v: v not in (None, "[]"), "a mask_length schedule: ours is fixed"),
    ("inbatch_noise_augment_volume", lambda v: v is not None and float(v) != 1.0, "noise volume != 1"),
]


def _literal(text: object) -> Any:
    """Values fairseq keeps as strings and `eval`s ("[(512,10,5)] + [(512,3,2)] * 4", "[1, 3]"): parsed as
    literals joined by list `+` and `*` only, never evaluated."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.List | ast.Tuple):
            items = [walk(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = walk(node.left), walk(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")

    if not isinstance(text, str):
        return text
    return walk(ast.parse(text, mode="eval").body)


def _model_fields(
    model: Mapping[str, Any],
    task: Mapping[str, Any],
    criterion: Mapping[str, Any] | None,
    warnings: list[str],
) -> dict[str, Any]:
    """ModelConfig fields from fairseq's model/task/criterion config (shapes, then training knobs)."""

    def get(
        key: str, section: Mapping[str, Any] = model, defaults: Mapping[str, Any] = _MODEL_DEFAULTS
    ) -> Any:
        if key in section and section[key] is not None:
            return section[key]
        warnings.append(f"cfg lacks {key}: fairseq's default {defaults[key]!r} assumed")
        return defaults[key]

    try:
        layers = [tuple(int(v) for v in layer) for layer in _literal(get("conv_feature_layers"))]
        number_range = _literal(get("inbatch_noise_augment_number_range"))
        len_range = _literal(get("inbatch_noise_augment_len_range"))
    except (ValueError, TypeError, SyntaxError) as err:
        raise ValueError(f"unreadable fairseq model cfg: {_one_line(err)}") from None
    if any(len(layer) != 3 for layer in layers) or not layers:
        raise ValueError(f"conv_feature_layers is not a list of (dim, kernel, stride): {layers}")
    if len({dim for dim, _, _ in layers}) != 1:
        warnings.append(f"conv_feature_layers has several widths {layers}: our front end has one conv_dim")
    mode = get("extractor_mode")
    if mode not in ("default", "layer_norm"):
        raise ValueError(f"unknown fairseq extractor_mode {mode!r}")
    embed_dim = int(get("encoder_embed_dim"))
    final_dim = int(get("final_dim"))
    relax = float(get("attention_relax"))
    mixture = float(get("mixture_prob"))
    out: dict[str, Any] = {
        "conv_dim": layers[-1][0],
        "conv_kernels": tuple(k for _, k, _ in layers),
        "conv_strides": tuple(s for _, _, s in layers),
        "feat_extract_norm": "group" if mode == "default" else "layer",
        "embed_dim": embed_dim,
        "num_layers": int(get("encoder_layers")),
        "num_heads": int(get("encoder_attention_heads")),
        "ffn_dim": int(get("encoder_ffn_embed_dim")),
        "layer_norm_first": bool(get("layer_norm_first")),
        "pos_conv_kernel": int(get("conv_pos")),
        "pos_conv_groups": int(get("conv_pos_groups")),
        "final_dim": final_dim if final_dim > 0 else embed_dim,
        "dropout": float(get("dropout")),
        "attention_dropout": float(get("attention_dropout")),
        "activation_dropout": float(get("activation_dropout")),
        "dropout_input": float(get("dropout_input")),
        "layerdrop": float(get("encoder_layerdrop")),
        "attention_relax": relax if relax > 0 else 0.0,  # fairseq -1 = off, ours 0 = off
        "feature_grad_mult": float(get("feature_grad_mult")),
        "mask_prob": float(get("mask_prob")),
        "mask_length": int(get("mask_length")),
        "logit_temp": float(get("logit_temp")),
        "sample_rate": int(get("sample_rate", task, _TASK_DEFAULTS)),
        # MERT mixes a clip when mixture_prob > 0 and torch.rand(1) > mixture_prob: probability 1 - p
        "noise_prob": 1.0 - mixture if mixture > 0 else 0.0,
        "noise_min_samples": int(len_range[0]),
        "noise_max_samples": int(len_range[1]),
        "noise_max_segments": int(number_range[1]),
    }
    if int(number_range[0]) != 1:
        warnings.append(f"inbatch_noise_augment_number_range {number_range}: ours draws 1..max segments")
    cqt = bool(get("audio_cqt_loss_m"))
    if cqt:
        bins = int(get("audio_cqt_bins"))
        out.update(cqt_bins=bins, cqt_bins_per_octave=bins // 7, cqt_fmin=_CQT_FMIN)
    # the hubert criterion weighs get_extra_losses() in order: features_pen, then cqt_pred_m if enabled
    weights = None if criterion is None else criterion.get("loss_weights", "absent")
    if weights == "absent":
        warnings.append("cfg lacks criterion.loss_weights: feature_pen_weight and cqt_weight left at ours")
        if not cqt:
            out["cqt_weight"] = 0.0
    else:
        extra = 1 + int(cqt) + int(bool(model.get("audio_mel_loss_m")))
        weights = [] if weights is None else [float(w) for w in _literal(weights)]
        if len(weights) == 1:
            weights = weights * extra
        if weights and len(weights) != extra:
            raise ValueError(f"criterion.loss_weights {weights} for {extra} extra losses")
        out["feature_pen_weight"] = weights[0] if weights else 0.0
        out["cqt_weight"] = weights[1] if weights and cqt else 0.0
    label_rate = model.get("label_rate", task.get("label_rate"))
    hop = int(np.prod(out["conv_strides"]))
    if label_rate is not None and abs(float(label_rate) * hop - out["sample_rate"]) > 1e-6:
        warnings.append(f"label_rate {label_rate} is not sample_rate / hop: our labels are one per frame")
    for key, differs, what in _UNSUPPORTED:
        value = model.get(key)
        if value is not None and differs(value):
            warnings.append(f"{key}={value!r}: {what}")
    known = {f.name for f in fields(ModelConfig)}
    assert set(out) <= known, set(out) - known
    return out


# ---------------------------------------------------------------------------------------------------
# the state dict: fairseq names -> ours
# ---------------------------------------------------------------------------------------------------

_PLAIN = {
    "post_extract_proj.weight": "feature_projection.projection.weight",
    "post_extract_proj.bias": "feature_projection.projection.bias",
    "layer_norm.weight": "feature_projection.layer_norm.weight",
    "layer_norm.bias": "feature_projection.layer_norm.bias",
    "mask_emb": "masked_spec_embed",
    "encoder.layer_norm.weight": "encoder.layer_norm.weight",
    "encoder.layer_norm.bias": "encoder.layer_norm.bias",
    "encoder_cqt_model.fc.weight": "cqt_head.weight",
    "encoder_cqt_model.fc.bias": "cqt_head.bias",
}
_POS = "encoder.pos_conv_embed.conv."
_POS_CONV = {  # nn.utils.weight_norm (fairseq 0.12) or the parametrization API (newer torch)
    "encoder.pos_conv.0.bias": _POS + "bias",
    "encoder.pos_conv.0.weight_g": _POS + "parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": _POS + "parametrizations.weight.original1",
    "encoder.pos_conv.0.parametrizations.weight.original0": _POS + "parametrizations.weight.original0",
    "encoder.pos_conv.0.parametrizations.weight.original1": _POS + "parametrizations.weight.original1",
}
_LAYER_PARTS = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.out_proj",
    "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_CONV_KEY = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.(.+)")
_DROP_PREFIXES = [  # (prefix, reason) for keys with a known meaning and no counterpart
    ("encoder_cqt_model.", "CQT target transform buffers (nnAudio kernels): ours are rebuilt, not stored"),
    ("encoder_mel_model.", "mel reconstruction head and its transform (audio_mel_loss_m): ours has none"),
    (
        "feature_extractor_cqt.",
        "CQT-input extractor buffers (feature_extractor_cqt): ours takes no CQT input",
    ),
    ("target_glu.", "target GLU (target_glu): ours has none"),
    ("logit_temp_list", "learnable logit temperatures (learnable_temp): ours uses the fixed logit_temp"),
    ("encoder.pos_conv.", "positional conv layout our model does not have (pos_conv_depth / batch norm)"),
]
_LAYER_DROPS = {
    "ffn_layernorm": "SubLN ffn_layernorm (subln): our encoder layers have none",
    "self_attn.bias_k": "add_bias_kv attention bias: ours has none",
    "self_attn.bias_v": "add_bias_kv attention bias: ours has none",
}


def _split_weight_norm(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pos conv stored without weight norm -> (g, v) for weight_norm(dim=2): g = ||w|| over dims 0, 1."""
    return weight.norm(dim=(0, 1), keepdim=True), weight


def _map_encoder(
    sd: Mapping[str, torch.Tensor], feat_norm: str, pos_layout_ok: bool
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """(our encoder state, dropped keys with reasons); the training heads are left to _map_heads."""
    state: dict[str, torch.Tensor] = {}
    dropped: list[tuple[str, str]] = []
    heads = {"final_proj.weight", "final_proj.bias", "label_embs_concat"}
    heads |= {k for k in sd if k.startswith("final_projs.")}
    for key, tensor in sd.items():
        if key in heads:
            continue
        if key in _PLAIN:
            state[_PLAIN[key]] = tensor
            continue
        if pos_layout_ok and key in _POS_CONV:
            state[_POS_CONV[key]] = tensor
            continue
        if pos_layout_ok and key == "encoder.pos_conv.0.weight":
            g, v = _split_weight_norm(tensor)
            state[_POS + "parametrizations.weight.original0"] = g
            state[_POS + "parametrizations.weight.original1"] = v
            continue
        conv = _CONV_KEY.fullmatch(key)
        if conv:
            index, rest = int(conv.group(1)), conv.group(2)
            ours = f"feature_extractor.conv_layers.{index}."
            param = rest.rsplit(".", 1)[-1]
            if rest == "0.weight":
                state[ours + "conv.weight"] = tensor
            elif rest == "0.bias":
                dropped.append((key, "conv bias (conv_bias): our front-end convs have none"))
            elif feat_norm == "group" and index == 0 and rest in ("2.weight", "2.bias"):
                state[ours + "layer_norm." + param] = tensor  # Fp32GroupNorm, third in the block
            elif feat_norm == "layer" and rest in ("2.1.weight", "2.1.bias"):
                state[ours + "layer_norm." + param] = tensor  # Sequential(TransposeLast, Fp32LayerNorm, ...)
            else:
                dropped.append((key, f"front-end tensor not in a {feat_norm}-norm front end"))
            continue
        layer = _LAYER_KEY.fullmatch(key)
        if layer and layer.group(2) in _LAYER_PARTS:
            state[f"encoder.layers.{layer.group(1)}.{_LAYER_PARTS[layer.group(2)]}.{layer.group(3)}"] = tensor
            continue
        in_layer = re.fullmatch(r"encoder\.layers\.\d+\.(.+)", key)
        reason = None
        if in_layer:
            reason = next(
                (why for name, why in _LAYER_DROPS.items() if in_layer.group(1).startswith(name)), None
            )
        if reason is None:
            reason = next((why for prefix, why in _DROP_PREFIXES if key.startswith(prefix)), None)
        dropped.append((key, reason or "no counterpart in our MERT"))
    return state, dropped


def _dictionary_rows(stub: Any, label: str, warnings: list[str]) -> tuple[int, int, list[int]]:
    """(rows in fairseq's block, classes, block rows in our order) of one Dictionary: its special rows
    first, then code k's row for k = 0..classes-1. fairseq encodes label k as indices[str(k)] (4 specials
    first, so normally k + 4); its softmax runs over every row, so the specials are kept as negatives."""
    symbols = list(getattr(stub, "symbols", []) or [])
    nspecial = int(getattr(stub, "nspecial", 4))
    indices = dict(getattr(stub, "indices", {}) or {})
    classes = len(symbols) - nspecial
    if classes <= 0:
        raise ValueError(f"dictionary of label {label} has {len(symbols)} symbols and {nspecial} specials")
    rows = [indices.get(str(k), -1) for k in range(classes)]
    if any(r < 0 or r >= len(symbols) for r in rows) or len(set(rows)) != classes:
        warnings.append(
            f"dictionary of {label} is not the codes 0..{classes - 1}: code k read from row k + {nspecial}"
        )
        rows = [nspecial + k for k in range(classes)]
    taken = set(rows)
    return len(symbols), classes, [r for r in range(len(symbols)) if r not in taken] + rows


def _label_layout(
    task_state: Any,
    names: list[str] | None,
    sd: Mapping[str, torch.Tensor],
    final_dim: int,
    warnings: list[str],
) -> tuple[list[tuple[str, int]], list[int], int, int]:
    """(label_classes, fairseq row of each of our rows, fairseq rows in all, special rows per label). From
    the task's dictionaries when the checkpoint has them, else from label_embs_concat rows split evenly
    over the heads. Our rows of a label: its special rows, then its codes in order (model.MERT's layout)."""
    dicts = task_state.get("dictionaries") if isinstance(task_state, Mapping) else None
    if dicts is None and isinstance(task_state, Mapping) and task_state.get("target_dictionary") is not None:
        dicts = [task_state["target_dictionary"]]
    if isinstance(dicts, list | tuple) and dicts and all(isinstance(d, FairseqDictionaryStub) for d in dicts):
        if names is not None and len(names) != len(dicts):
            raise ValueError(f"cfg names {len(names)} labels but task_state holds {len(dicts)} dictionaries")
        names = names or [f"label_{i}" for i in range(len(dicts))]
        classes, order, offset, specials = [], [], 0, set()
        for name, stub in zip(names, dicts, strict=True):
            size, count, rows = _dictionary_rows(stub, name, warnings)
            classes.append((name, count))
            specials.add(size - count)
            order += [offset + r for r in rows]
            offset += size
        if len(specials) != 1:
            raise ValueError(f"label dictionaries with different special row counts {sorted(specials)}")
        return classes, order, offset, specials.pop()
    emb = sd.get("label_embs_concat")
    if names is None:
        proj = sd.get("final_proj.weight")
        if proj is None or proj.shape[0] % final_dim:
            raise ValueError(
                "no dictionaries, no cfg labels and no untied final_proj: cannot count the heads"
            )
        names = [f"label_{i}" for i in range(proj.shape[0] // final_dim)]
    if emb is None:
        raise ValueError("no dictionaries and no label_embs_concat: cannot tell the label classes")
    if emb.shape[0] % len(names):
        raise ValueError(f"label_embs_concat has {emb.shape[0]} rows, not a multiple of {len(names)} heads")
    size = emb.shape[0] // len(names)
    warnings.append(f"no dictionaries in task_state: {size} rows per label, the first 4 taken as specials")
    classes = [(name, size - 4) for name in names]
    return classes, list(range(emb.shape[0])), emb.shape[0], 4


def _map_heads(
    sd: Mapping[str, torch.Tensor],
    num_heads: int,
    final_dim: int,
    order: list[int],
    total_rows: int,
    specials: int,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """final_proj (untied, tied -> tiled, or final_projs.N -> concatenated) and label_embs_concat, every
    row kept, reordered to each label's special rows then its codes in order."""
    state: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    if "final_proj.weight" in sd:
        weight, bias = sd["final_proj.weight"], sd.get("final_proj.bias")
        if weight.shape[0] == final_dim * num_heads:
            mode, tiles = "untied", 1
        elif weight.shape[0] == final_dim:
            mode, tiles = "tied, tiled once per codebook", num_heads
        else:
            raise ValueError(f"final_proj has {weight.shape[0]} outputs for {num_heads} heads of {final_dim}")
        state["final_proj.weight"] = weight.repeat(tiles, 1) if tiles > 1 else weight
        if bias is not None:
            state["final_proj.bias"] = bias.repeat(tiles) if tiles > 1 else bias
        info["final_proj"] = {"source": "final_proj", "mode": mode, "out_features": final_dim * num_heads}
    elif any(k.startswith("final_projs.") for k in sd):
        count = len({k.split(".")[1] for k in sd if k.startswith("final_projs.")})
        if count != num_heads:
            raise ValueError(f"final_projs holds {count} projections for {num_heads} heads")
        state["final_proj.weight"] = torch.cat([sd[f"final_projs.{i}.weight"] for i in range(count)])
        if "final_projs.0.bias" in sd:
            state["final_proj.bias"] = torch.cat([sd[f"final_projs.{i}.bias"] for i in range(count)])
        info["final_proj"] = {
            "source": "final_projs.N",
            "mode": "per codebook",
            "out_features": final_dim * count,
        }
    if "label_embs_concat" in sd:
        emb = sd["label_embs_concat"]
        if emb.shape[0] != total_rows or emb.shape[1] != final_dim:
            raise ValueError(
                f"label_embs_concat is {tuple(emb.shape)}, the dictionaries say ({total_rows}, {final_dim})"
            )
        state["label_embs_concat"] = emb[torch.tensor(order, dtype=torch.long)].clone()
        info["label_embs_concat"] = {
            "rows": total_rows,
            "special_rows_per_label": specials,
        }
    if "encoder_cqt_model.fc.weight" in sd:
        info["cqt_head"] = {
            "source": "encoder_cqt_model.fc",
            "bins": int(sd["encoder_cqt_model.fc.weight"].shape[0]),
        }
    return state, info


def _check_shapes(fields_: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """The cfg-derived shapes must agree with the tensors (a mismatch means a cfg from another model)."""

    def expect(key: str, shape: tuple[int, ...]) -> None:
        if key in state and tuple(state[key].shape) != shape:
            raise ValueError(
                f"cfg implies {key} of shape {shape}, the checkpoint has {tuple(state[key].shape)}"
            )

    dim, ffn, conv = fields_["embed_dim"], fields_["ffn_dim"], fields_["conv_dim"]
    if "masked_spec_embed" not in state or not any(k.startswith("encoder.layers.0.") for k in state):
        raise ValueError(
            "the model state has no mask_emb or encoder.layers.0: not a MERT/HuBERT pretraining model"
        )
    expect("masked_spec_embed", (dim,))
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    if layers != set(range(fields_["num_layers"])):
        raise ValueError(f"cfg says {fields_['num_layers']} encoder layers, the checkpoint has {len(layers)}")
    if dim % fields_["num_heads"]:
        raise ValueError(f"encoder_embed_dim {dim} is not a multiple of {fields_['num_heads']} heads")
    expect("encoder.layers.0.feed_forward.intermediate_dense.weight", (ffn, dim))
    for i, kernel in enumerate(fields_["conv_kernels"]):
        expect(f"feature_extractor.conv_layers.{i}.conv.weight", (conv, 1 if i == 0 else conv, kernel))
    kernel, groups = fields_["pos_conv_kernel"], fields_["pos_conv_groups"]
    expect(_POS + "parametrizations.weight.original1", (dim, dim // groups, kernel))
    if "cqt_bins" in fields_:
        expect("cqt_head.weight", (fields_["cqt_bins"], dim))


def _config_sections(
    ckpt: Mapping[str, Any],
) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any] | None]:
    """(model, task, criterion) config: hydra-era `cfg` dicts, or the flat `args` Namespace of older runs."""
    cfg = ckpt.get("cfg")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        task = cfg.get("task") if isinstance(cfg.get("task"), Mapping) else {}
        criterion = cfg.get("criterion") if isinstance(cfg.get("criterion"), Mapping) else None
        return cfg["model"], task, criterion
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        flat = vars(args)
        return flat, flat, flat
    raise ValueError(
        "no cfg with a model section (nor a legacy args Namespace): not a fairseq MERT checkpoint"
    )


def load_fairseq_checkpoint(path: str | Path) -> FairseqCheckpoint:
    """Read an official MERT fairseq checkpoint safely and rename it for `model.MERT`.

    Build the model with `ModelConfig(**ckpt.model_fields, codebooks=...)` (see `codebooks_from_labels`)
    and `load_state_dict(ckpt.state)`. Raises a one-line ValueError for a file that names a global
    outside the allow-list (nothing from it is run), or that is not a fairseq MERT/HuBERT checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    ckpt = _safe_load(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{path}: no 'model' state dict: not a fairseq checkpoint")
    sd = ckpt["model"]
    if not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: 'model' is not a state dict of tensors: not a fairseq checkpoint")
    try:
        model_cfg, task_cfg, criterion = _config_sections(ckpt)
        warnings: list[str] = []
        model_fields = _model_fields(model_cfg, task_cfg, criterion, warnings)
        pos_ok = not model_cfg.get("conv_pos_batch_norm") and int(model_cfg.get("pos_conv_depth") or 1) == 1
        state, dropped = _map_encoder(sd, model_fields["feat_extract_norm"], pos_ok)
        labels = task_cfg.get("labels")
        names = [str(n) for n in _literal(labels)] if labels is not None else None
        label_classes, order, total, specials = _label_layout(
            ckpt.get("task_state"), names, sd, model_fields["final_dim"], warnings
        )
        model_fields["label_specials"] = specials
        head_state, heads = _map_heads(
            sd, len(label_classes), model_fields["final_dim"], order, total, specials
        )
        state.update(head_state)
        _check_shapes(model_fields, state)
    except (ValueError, KeyError, TypeError, IndexError) as err:  # a malformed cfg or state: one line
        kind = "" if isinstance(err, ValueError) else f"malformed checkpoint ({type(err).__name__}): "
        raise ValueError(f"{path}: {kind}{_one_line(err)}") from None
    return FairseqCheckpoint(
        state=state,
        model_fields=model_fields,
        label_classes=label_classes,
        heads=heads,
        dropped=dropped,
        warnings=warnings,
    )


def codebooks_from_labels(
    label_classes: list[tuple[str, int]], rename: Mapping[str, str] | None = None
) -> list[tuple[str, int, int]]:
    """Group fairseq's per-codebook labels into ModelConfig.codebooks: encodec_0..encodec_7 of 1024 classes
    -> [("encodec", 8, 1024)] (`rename` maps a prefix to our teacher name, e.g. {"encodec": "rvq"}).
    Labels without a `_<index>` suffix count as one codebook each."""
    rename = rename or {}
    groups: list[tuple[str, int, int]] = []
    for name, classes in label_classes:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        prefix, index = (match.group(1), int(match.group(2))) if match else (name, 0)
        teacher = rename.get(prefix, prefix)
        if groups and groups[-1][0] == teacher and groups[-1][2] == classes and index == groups[-1][1]:
            groups[-1] = (teacher, groups[-1][1] + 1, classes)
        else:
            if index != 0:
                raise ValueError(f"label {name} does not continue a codebook run starting at index 0")
            groups.append((teacher, 1, classes))
    return groups
