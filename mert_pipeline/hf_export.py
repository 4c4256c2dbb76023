"""Load trainer checkpoints and export their encoder as a plain `transformers.HubertModel` directory.

Our module names already follow `HubertModel` (see trainer/model.py), so the export is a filtered copy of
the state dict: the encoder keys go to `model.safetensors`, the training-only parts (final_proj,
label_embs_concat, cqt_head) are dropped and listed. `config.json` says `model_type: hubert` and
`architectures: [HubertModel]` with no `auto_map`, so `AutoModel.from_pretrained(OUT)` needs no remote
code (the released MERT checkpoints do, and break on some transformers versions).

Hidden states: L + 1 tensors, [0] the encoder's input to layer 1 (post-LN: after the encoder LayerNorm;
pre-LN: before any norm), [i] layer i's output, and for pre-LN the last one after the final LayerNorm
(what transformers 4 and the released MERT return with `output_hidden_states=True`; transformers 5 returns
layer L's output before that norm as hidden_states[-1] and the normed one as last_hidden_state, so
`hf_hidden_states` takes the last one from last_hidden_state and both paths agree on any version).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mert_pipeline.fs import atomic_path, atomic_write_json

ENCODER_PREFIXES = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")


class CheckpointError(ValueError):
    """A path that is not a trainer checkpoint (or run folder holding one): a one-line message."""


def resolve_checkpoint(path: Path) -> Path:
    """A trainer checkpoint file, or a trainer run folder's newest `ckpt-*.pt` (`model_path` decides which
    a path is); any other model source is a CheckpointError naming what it is."""
    from mert_pipeline.model_path import NotAModel, identify_model

    try:
        found = identify_model(path)
    except NotAModel as exc:
        raise CheckpointError(str(exc)) from exc
    if not found.is_trainer_checkpoint:
        raise CheckpointError(f"{path} is {found.describe()}, not a trainer checkpoint or run folder")
    return found.file


def load_checkpoint(path: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """(ModelConfig, model state dict, {step, path}) of a trainer checkpoint, read with weights_only."""
    from mert_pipeline.trainer.model import ModelConfig

    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        values = dict(state["config"]["model"])
        model_state = state["model"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path} is not a trainer checkpoint: {str(exc).splitlines()[0]}") from exc
    names = {f.name: f for f in dataclasses.fields(ModelConfig)}
    values = {
        k: tuple(v) if str(names[k].type).startswith("tuple") and isinstance(v, list) else v
        for k, v in values.items()
        if k in names
    }
    values["codebooks"] = [tuple(c) for c in values.get("codebooks", [])]
    values.setdefault("label_specials", 0)  # checkpoints older than the field: heads without special rows
    meta = {"step": int(state.get("step", 0)), "path": str(path), "init": state["config"].get("init") or {}}
    return ModelConfig(**values), model_state, meta


def build_encoder(cfg: Any, state: dict[str, torch.Tensor] | None, seed: int = 0) -> torch.nn.Module:
    """Our MERT in eval mode without the CQT target (not needed to encode); `state` None = random init
    with `seed` (the baseline a trained checkpoint is compared against)."""
    from mert_pipeline.trainer.model import MERT

    cfg = dataclasses.replace(cfg, cqt_weight=0.0, codebooks=list(cfg.codebooks) or [("none", 1, 2)])
    torch.manual_seed(seed)
    model = MERT(cfg)
    if state is not None:
        keep = encoder_state(state)  # the training heads are not needed to encode
        model.load_state_dict(keep, strict=False)
        missing = [k for k in encoder_state(model.state_dict()) if k not in keep]
        if missing:
            raise CheckpointError(f"checkpoint lacks encoder weights {missing[:3]}")
    return model.eval()


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


@torch.no_grad()
def mert_hidden_states(model: torch.nn.Module, audio: torch.Tensor) -> list[torch.Tensor]:
    """All L + 1 hidden states of our model for (B, N) audio, in transformers' convention (module docstring),
    captured with hooks so that the model's own forward is what runs."""
    layers = model.encoder.layers
    states: list[torch.Tensor] = []
    hooks = [layers[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda m, a, out: states.append(out)) for layer in layers[:-1]]
    try:
        final, _ = model.encode(audio, None)
    finally:
        for hook in hooks:
            hook.remove()
    return states + [final]


def hubert_config(cfg: Any) -> dict[str, Any]:
    """HubertConfig keyword arguments for our ModelConfig (spec augment off: it is training-only)."""
    n = len(cfg.conv_kernels)
    return {
        "architectures": ["HubertModel"],
        "model_type": "hubert",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": "gelu",
        "hidden_dropout": cfg.dropout,
        "activation_dropout": cfg.activation_dropout,
        "attention_dropout": cfg.attention_dropout,
        "feat_proj_dropout": cfg.dropout_input,
        "feat_proj_layer_norm": True,
        "final_dropout": 0.0,
        "layerdrop": cfg.layerdrop,
        "layer_norm_eps": 1e-5,
        "feat_extract_norm": cfg.feat_extract_norm,
        "feat_extract_activation": "gelu",
        "conv_dim": [cfg.conv_dim] * n,
        "conv_stride": list(cfg.conv_strides),
        "conv_kernel": list(cfg.conv_kernels),
        "conv_bias": False,
        "conv_pos_batch_norm": False,
        "num_conv_pos_embeddings": cfg.pos_conv_kernel,
        "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        "do_stable_layer_norm": bool(cfg.layer_norm_first),
        "apply_spec_augment": False,
        "sampling_rate": cfg.sample_rate,
        "torch_dtype": "float32",
    }


def preprocessor_config(cfg: Any, do_normalize: bool = False) -> dict[str, Any]:
    """Wav2Vec2FeatureExtractor settings; the trainer feeds raw audio (not normalised): do_normalize False."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": cfg.sample_rate,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": True,
        "do_normalize": do_normalize,
    }


def probe_signal(sample_rate: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A fixed test signal (a chord plus noise) for the export's own equality check."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    rng = np.random.default_rng(seed)
    wave = sum(0.2 * np.sin(2 * math.pi * f * t) for f in (220.0, 277.2, 329.6))
    return (wave + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@torch.no_grad()
def hf_hidden_states(model: torch.nn.Module, audio: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(L + 1 hidden states in our convention, transformers' own hidden_states[-1]) of a HubertModel."""
    result = model(audio, output_hidden_states=True)
    states = list(result.hidden_states)
    return states[:-1] + [result.last_hidden_state], states[-1]


def compare_with_transformers(out: Path, model: torch.nn.Module, audio: np.ndarray) -> float:
    """Largest absolute difference between our model and AutoModel(out) in fp32 over all hidden states,
    transformers' raw hidden_states[-1] included (checked against layer L's output, normed or not)."""
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    hf = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    x = torch.from_numpy(audio)[None]
    theirs, raw_last = hf_hidden_states(hf, x)
    last_layer: list[torch.Tensor] = []
    hook = model.encoder.layers[-1].register_forward_hook(lambda m, a, out: last_layer.append(out))
    try:
        ours = mert_hidden_states(model, x)
    finally:
        hook.remove()
    if len(theirs) != len(ours):
        return math.inf
    diffs = [float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True)]
    diffs.append(min(float((raw_last - c).abs().max()) for c in (ours[-1], last_layer[-1])))
    return max(diffs)


def export_hf(checkpoint: Path, out: Path, verify: bool = True, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write OUT/{config.json, model.safetensors, preprocessor_config.json, export.json}; with `verify`,
    load OUT with transformers and check every hidden state against ours on a 1 s signal."""
    from safetensors.torch import save_file

    cfg, state, meta = load_checkpoint(checkpoint)
    kept = {k: v.detach().float().contiguous() for k, v in encoder_state(state).items()}
    dropped = {k: list(v.shape) for k, v in state.items() if k not in kept}
    if not kept:
        raise CheckpointError(f"{meta['path']} holds no encoder weights")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(dict(sorted(kept.items())), str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hubert_config(cfg))
    atomic_write_json(out / "preprocessor_config.json", preprocessor_config(cfg))
    summary: dict[str, Any] = {
        "checkpoint": meta["path"],
        "step": meta["step"],
        "out": str(out),
        "parameters": int(sum(v.numel() for v in kept.values())),
        "kept_tensors": len(kept),
        "dropped": dropped,
        "dropped_parameters": int(sum(math.prod(s) for s in dropped.values())),
        "do_stable_layer_norm": bool(cfg.layer_norm_first),
        "feat_extract_norm": cfg.feat_extract_norm,
        "max_abs_diff": None,
        "init_from": meta["init"],  # the weights the run started from ({} for a run from scratch)
    }
    if verify:
        diff = compare_with_transformers(out, build_encoder(cfg, state), probe_signal(cfg.sample_rate))
        summary["max_abs_diff"] = diff
        if not diff <= tolerance:
            raise CheckpointError(
                f"transformers' HubertModel differs from our model by {diff:.3g} (> {tolerance:g}) on {out}"
            )
    atomic_write_json(out / "export.json", summary)
    return summary
