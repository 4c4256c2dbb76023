"""MERT weights from any published source, to start a run from (`--init-from PATH`) or to read features of.

Four sources, told apart by what the path holds:

- `hf`: a Hugging Face directory: the released MERT-v1 (`config.json` with `model_type: mert_model`) or a
  `mert-pipe export hf` directory (`model_type: hubert`); weights in `model.safetensors` or
  `pytorch_model.bin`, the positional conv as `weight_g`/`weight_v` or as parametrizations;
- `checkpoint`: one of our trainer checkpoints (`ckpt-*.pt`, or a run folder: its newest);
- `fairseq`: the official `MERT-v1-{95M,330M}_fairseq.pt` (`trainer.fairseq_checkpoint`).

`mert_pipeline.model_path.identify_model` decides which one a path is, from what it holds (a run folder
holds a `config.json` too, the trainer's run config, and is still a run folder).

Loading is safe only: safetensors, or `torch.load(weights_only=True)`; a fairseq pickle goes through a
short allow-list of stub classes. The model's shape comes from the source (`SHAPE_FIELDS`); the training
heads (`final_proj`, `label_embs_concat`, `cqt_head`) are copied per codebook where the source has a head of
the same teacher, codebook and class count, and re-initialised otherwise, so every tensor of the model is
either loaded or listed as re-initialised, and every tensor of the source is used or listed as unused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The fields that decide tensor shapes: they come from the source, and an override that changes one is
# refused. Every other ModelConfig field (dropout, masking, loss weights) is a training knob.
SHAPE_FIELDS = (
    "conv_dim",
    "conv_kernels",
    "conv_strides",
    "feat_extract_norm",
    "embed_dim",
    "num_layers",
    "num_heads",
    "ffn_dim",
    "layer_norm_first",
    "pos_conv_kernel",
    "pos_conv_groups",
)
HEAD_PREFIXES = ("final_proj.", "label_embs_concat", "cqt_head.")
_POS_CONV = "encoder.pos_conv_embed.conv."


class WeightsError(ValueError):
    """A source that cannot initialise the model, said in one line."""


@dataclass
class Source:
    """What `--init-from` names: its kind, the fields it fixes, its tensors (our names), its heads."""

    kind: str  # hf | checkpoint | fairseq
    path: Path  # the file read (a directory's weights file)
    sha256: str
    fields: dict[str, Any]  # ModelConfig values the source fixes (shapes, and final_dim when it has heads)
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    heads: list[tuple[str, int, int]] = field(default_factory=list)  # (teacher, codebook, classes)
    label_specials: int = 0  # never-target rows before the codes in each head's label_embs_concat block
    unused: dict[str, str] = field(default_factory=dict)  # source key -> why it is not loaded

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256}


# --------------------------------------------------------------------------------------------------
# Reading a source
# --------------------------------------------------------------------------------------------------


def read_source(path: str | Path, with_state: bool = True) -> Source:
    """The source at `path` (module docstring; `mert_pipeline.model_path` decides its kind); `with_state`
    False reads only what fixes the shapes."""
    from mert_pipeline.model_path import NotAModel, identify_model

    try:
        found = identify_model(path)
    except NotAModel as exc:
        raise WeightsError(f"--init-from {exc}") from exc
    if found.is_hf:
        return _read_hf(found.file, with_state)
    if found.kind == "fairseq":
        return _read_fairseq(found.file)
    return _read_checkpoint(found.file, with_state)


def _sha256(path: Path) -> str:
    from mert_pipeline.fs import sha256_file

    return sha256_file(path)


def _read_hf(directory: Path, with_state: bool) -> Source:
    config = json.loads((directory / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ("mert_model", "hubert"):
        raise WeightsError(f"{directory}/config.json: model_type {model_type!r} is not mert_model or hubert")
    for flag, why in (
        ("feature_extractor_cqt", "a CQT input front end"),
        ("deepnorm", "DeepNorm"),
        ("conv_bias", "conv biases"),
    ):
        if config.get(flag):
            raise WeightsError(
                f"{directory}: {flag} is true ({why}), which this trainer's model does not have"
            )
    weights = next(
        (directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).exists()), None
    )
    if weights is None:
        raise WeightsError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")
    fields = hf_fields(config)
    source = Source("hf", weights, _sha256(weights) if with_state else "", fields)
    if with_state:
        state = _load_tensors(weights)
        source.state = _hf_names(state, source.unused)
    return source


def hf_fields(config: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig values of a HubertConfig / MERTConfig `config.json` (shapes and the knobs it records)."""
    try:
        dims = set(config["conv_dim"])
        if len(dims) != 1:
            raise WeightsError(
                f"conv_dim {config['conv_dim']}: this model has one width for every conv layer"
            )
        fields: dict[str, Any] = {
            "conv_dim": dims.pop(),
            "conv_kernels": tuple(config["conv_kernel"]),
            "conv_strides": tuple(config["conv_stride"]),
            "feat_extract_norm": config.get("feat_extract_norm", "group"),
            "embed_dim": config["hidden_size"],
            "num_layers": config["num_hidden_layers"],
            "num_heads": config["num_attention_heads"],
            "ffn_dim": config["intermediate_size"],
            "layer_norm_first": bool(config.get("do_stable_layer_norm", False)),
            "pos_conv_kernel": config["num_conv_pos_embeddings"],
            "pos_conv_groups": config["num_conv_pos_embedding_groups"],
        }
    except (KeyError, TypeError) as exc:
        raise WeightsError(f"config.json lacks {exc} (not a HubertConfig / MERTConfig)") from exc
    rate = config.get("sample_rate", config.get("sampling_rate"))
    if rate is not None and int(rate) != 24000:
        raise WeightsError(f"config.json says {rate} Hz; MERT and this pipeline are 24 kHz")
    return fields


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A weights file, safely: safetensors, or a pickle of tensors read with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is one line for the user
        raise WeightsError(f"cannot read {path}: {' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def _hf_names(state: dict[str, torch.Tensor], unused: dict[str, str]) -> dict[str, torch.Tensor]:
    """HubertModel keys (optionally under `hubert.` or `model.`) -> ours: the same names, except the
    positional conv's old-style weight norm (weight_g, weight_v) -> parametrizations (original0, 1)."""
    renamed = {}
    for key, value in state.items():
        name = key
        for prefix in ("hubert.", "model."):
            if name.startswith(prefix) and not name.startswith(("feature_", "encoder.", "masked_")):
                name = name[len(prefix) :]
        if name.startswith(_POS_CONV):
            name = name.replace("conv.weight_g", "conv.parametrizations.weight.original0")
            name = name.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        if name.startswith(("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")):
            renamed[name] = value
        else:
            unused[key] = "not part of the encoder"
    return renamed


def _read_checkpoint(file: Path, with_state: bool) -> Source:
    """One of our trainer checkpoints (a run folder's newest, resolved by `identify_model`)."""
    from mert_pipeline.hf_export import CheckpointError, load_checkpoint

    try:
        cfg, state, _meta = load_checkpoint(file)
    except CheckpointError as exc:
        raise WeightsError(f"--init-from {exc}") from exc
    fields = {name: getattr(cfg, name) for name in (*SHAPE_FIELDS, "final_dim")}
    heads = [(teacher, q, classes) for teacher, n_q, classes in cfg.codebooks for q in range(n_q)]
    sha = _sha256(file) if with_state else ""
    state = state if with_state else {}
    return Source("checkpoint", file, sha, fields, state, heads, label_specials=cfg.label_specials)


def _read_fairseq(path: Path) -> Source:
    from mert_pipeline.trainer.fairseq_checkpoint import load_fairseq_checkpoint

    try:
        loaded = load_fairseq_checkpoint(path)
    except ValueError as exc:
        raise WeightsError(f"--init-from {path}: {' '.join(str(exc).split())}") from exc
    fields = {k: v for k, v in loaded.model_fields.items() if k in (*SHAPE_FIELDS, "final_dim")}
    heads = []
    for label, classes in loaded.label_classes:
        teacher, _, index = label.rpartition("_")
        # encodec_0..encodec_7 are the RVQ teacher's codebooks ("rvq" here); a k-means label is one codebook
        heads.append(("rvq", int(index), classes) if teacher == "encodec" else (label, 0, classes))
    unused = {str(key): str(why) for key, why in _pairs(loaded.dropped)}
    specials = int(loaded.model_fields["label_specials"])
    return Source("fairseq", path, _sha256(path), fields, loaded.state, heads, specials, unused)


def _pairs(dropped: Any) -> list[tuple[Any, Any]]:
    """The fairseq reader's unmapped keys, as (key, why) pairs."""
    if isinstance(dropped, dict):
        return list(dropped.items())
    return [item if isinstance(item, tuple) else (item, "not mapped") for item in dropped or []]


# --------------------------------------------------------------------------------------------------
# Applying it
# --------------------------------------------------------------------------------------------------


def apply_shape(cfg: Any, source: Source, overridden: set[str]) -> tuple[Any, list[str]]:
    """`cfg` with the source's shape (and, when it has heads, final_dim); an explicit override of a shape
    field to another value is refused. Returns the config and the lines saying what the source changed."""
    changed = []
    for name, value in source.fields.items():
        value = tuple(value) if isinstance(getattr(cfg, name), tuple) else value
        if getattr(cfg, name) == value:
            continue
        if name in overridden and name in SHAPE_FIELDS:
            raise WeightsError(
                f"{name}={getattr(cfg, name)} changes the shape of {source.path}, whose {name} is {value}: "
                f"leave {name} out (the model's shape comes from --init-from)"
            )
        if name == "final_dim" and name in overridden:
            continue  # a new final_dim re-initialises the heads instead
        changed.append(f"{name} {getattr(cfg, name)} -> {value}")
        cfg = dataclasses.replace(cfg, **{name: value})
    return cfg, changed


@torch.no_grad()
def initialise(model: torch.nn.Module, source: Source) -> dict[str, Any]:
    """Copy the source's tensors into `model` (same names and shapes), the heads codebook by codebook;
    returns what was loaded, re-initialised and left unused. The source's tensors are released as they
    are copied, so at most one extra copy of the weights exists, on the CPU."""
    own = model.state_dict()
    loaded, reinitialised = [], []
    for name, target in own.items():
        if name.startswith(HEAD_PREFIXES) or name not in source.state:
            continue
        value = source.state.pop(name)
        if value.shape != target.shape:
            raise WeightsError(
                f"{source.path}: {name} is {tuple(value.shape)}, the model's {tuple(target.shape)}"
            )
        target.copy_(value)
        loaded.append(name)
    missing = [n for n in own if not n.startswith(HEAD_PREFIXES) and n not in loaded]
    if missing:
        raise WeightsError(f"{source.path} lacks encoder tensors {missing[:3]} ({len(missing)} in all)")
    loaded_heads, reinit_heads = _copy_heads(model, source)
    reinitialised += reinit_heads
    unused = dict(source.unused)
    unused.update({k: "not in this model" for k in source.state if not k.startswith(HEAD_PREFIXES)})
    source.state.clear()
    return {
        **source.describe(),
        "loaded": len(loaded) + len(loaded_heads),
        "loaded_heads": loaded_heads,
        "reinitialised": reinitialised,
        "unused": unused,
    }


def _copy_heads(model: Any, source: Source) -> tuple[list[str], list[str]]:
    """final_proj and label_embs_concat per codebook where the source has the same teacher, codebook and
    class count (and the same final_dim); the CQT head when its shape matches. A head's code rows are
    copied code by code; its special rows (never a target) as far as the source has them."""
    state = source.state
    loaded: list[str] = []
    final_dim = model.cfg.final_dim
    ours_sp, src_sp = model.cfg.label_specials, source.label_specials
    src_heads = {(t, q): (i, classes) for i, (t, q, classes) in enumerate(source.heads)}
    src_offsets = [0]
    for _, _, classes in source.heads:
        src_offsets.append(src_offsets[-1] + src_sp + classes)
    weight, bias, embs = (
        state.get("final_proj.weight"),
        state.get("final_proj.bias"),
        state.get("label_embs_concat"),
    )
    fits = (
        weight is not None
        and bias is not None
        and embs is not None
        and embs.shape == (src_offsets[-1], final_dim)
        and weight.shape == (final_dim * len(source.heads), model.cfg.embed_dim)
    )
    offset = 0
    blocks = zip(model.heads, model.classes, model.rows, strict=True)  # model.rows: specials + classes
    for h, ((teacher, q), classes, size) in enumerate(blocks):
        match = src_heads.get((teacher, q))
        if fits and match is not None and match[1] == classes:
            i = match[0]
            rows = slice(i * final_dim, (i + 1) * final_dim)
            model.final_proj.weight[h * final_dim : (h + 1) * final_dim].copy_(weight[rows])
            model.final_proj.bias[h * final_dim : (h + 1) * final_dim].copy_(bias[rows])
            block, src = model.label_embs_concat[offset : offset + size], embs[src_offsets[i] :]
            block[ours_sp:].copy_(src[src_sp : src_sp + classes])  # the codes
            both = min(ours_sp, src_sp)
            block[:both].copy_(src[:both])  # the special rows the source has
            loaded.append(f"{teacher}[{q}]")
        offset += size
    reinit = [f"head {t}[{q}]" for t, q in model.heads if f"{t}[{q}]" not in loaded]
    if loaded and src_sp < ours_sp:  # e.g. a checkpoint of ours from before label_specials: no special rows
        reinit.append(f"special label rows {src_sp}..{ours_sp - 1} of the loaded heads")
    if loaded and src_sp > ours_sp:  # e.g. MERT-v1 into a model with label_specials 0
        source.unused[f"label_embs_concat special rows {ours_sp}..{src_sp - 1} of each head"] = (
            f"this model keeps {ours_sp} special rows a head (label_specials)"
        )
    cqt_w, cqt_b = state.get("cqt_head.weight"), state.get("cqt_head.bias")
    if model.cqt_head is not None:
        if cqt_w is not None and cqt_b is not None and cqt_w.shape == model.cqt_head.weight.shape:
            model.cqt_head.weight.copy_(cqt_w)
            model.cqt_head.bias.copy_(cqt_b)
            loaded.append("cqt_head")
        else:
            reinit.append("cqt_head")
    if not fits and source.heads:
        source.unused.update({k: "heads of another shape" for k in state if k.startswith(HEAD_PREFIXES)})
    return loaded, reinit


def encoder_parameters(cfg: Any) -> int:
    """Parameters of the encoder (no training heads) of a config, counted on the meta device."""
    from mert_pipeline.trainer.model import MERT

    cfg = dataclasses.replace(cfg, cqt_weight=0.0, codebooks=list(cfg.codebooks) or [("none", 1, 2)])
    with torch.device("meta"):
        model = MERT(cfg)
    return sum(
        math.prod(p.shape) for name, p in model.named_parameters() if not name.startswith(HEAD_PREFIXES)
    )


def load_encoder(path: str | Path) -> tuple[torch.nn.Module, Source]:
    """Our MERT encoder (eval mode, no training heads) with the weights of any source, and the source
    (its tensors released): what `features --kind model` and `embed` read a MERT-v1 model with."""
    from mert_pipeline.hf_export import build_encoder
    from mert_pipeline.trainer.model import ModelConfig

    source = read_source(path)
    cfg = ModelConfig(**{k: v for k, v in source.fields.items() if k in SHAPE_FIELDS})
    model = build_encoder(cfg, source.state)
    source.state = {}
    return model, source
