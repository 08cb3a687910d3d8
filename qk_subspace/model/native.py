"""TransformerLens-native checkpoint directories: read and validate one, unpickling nothing.

A native checkpoint is what a ``HookedTransformer`` is saved as when it never was a Hugging Face model
(trained with TransformerLens, or converted from a paper's own code)::

    hooked_transformer_config.json   a JSON object of HookedTransformerConfig fields
    model.safetensors                a HookedTransformer state dict (blocks.0.attn.W_Q [n_heads, d_model, d_head], ...)

Fields the file does not set keep TransformerLens' defaults; ``device`` and ``dtype`` are decided by
``load_model``'s arguments, and ``tokenizer_name`` is never fetched (a tokenizer comes from
``tokenizer=`` or tokenizer files in the directory). Weights are read with
``safetensors.torch.load_file`` only: a directory whose weights are pickled (``*.pt``, ``*.pth``,
``*.bin``, ...) is refused, because unpickling can run arbitrary code. The backends build the model
(``from_native`` in :mod:`.backends.hooked` and :mod:`.backends.bridge`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "PICKLE_SUFFIXES",
    "REQUIRED_FIELDS",
    "NativeCheckpoint",
    "check_processing",
    "check_state_dict",
    "hooked_config_fields",
    "is_native_checkpoint",
    "read_checkpoint",
]

#: The configuration file of a native checkpoint (its presence makes a directory one).
CONFIG_FILE = "hooked_transformer_config.json"
#: The weights file of a native checkpoint.
WEIGHTS_FILE = "model.safetensors"
#: Weight files that are pickles (``torch.save``): refused, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
#: Fields the file must set: the shapes of the weights.
REQUIRED_FIELDS = ("n_layers", "d_model", "d_head", "n_ctx", "d_vocab")
#: Fields ``load_model``'s arguments decide (ignored in the file).
PLACEMENT_FIELDS = ("device", "dtype")
#: Fields that are not passed to TransformerLens (``tokenizer_name`` would fetch a tokenizer from the hub).
DROPPED_FIELDS = ("tokenizer_name",)
#: State-dict entries that are buffers TransformerLens rebuilds from the configuration (causal mask,
#: the masking constant, rotary tables): not weights, so they may be absent and are never loaded.
BUFFER_SUFFIXES = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")

#: ``HookedTransformerConfig``'s fields and defaults (transformer-lens 3.9), less the required
#: ``d_model``/``d_head``/``n_layers``/``n_ctx`` and ``dtype``: the format's schema where TransformerLens
#: no longer has the class (4.x). On 3.x the class itself is the schema (tests check this record against it).
HOOKED_CONFIG_DEFAULTS: dict[str, Any] = {
    "n_heads": -1,
    "d_mlp": None,
    "d_vocab": -1,
    "device": None,
    "use_attn_result": False,
    "use_split_qkv_input": False,
    "default_prepend_bos": True,
    "positional_embedding_type": "standard",
    "n_key_value_heads": None,
    "attn_only": False,
    "gated_mlp": False,
    "uses_rms_norm": False,
    "eps": 1e-05,
    "layer_norm_folding": False,
    "act_fn": "relu",
    "normalization_type": "LN",
    "num_experts": None,
    "experts_per_token": None,
    "final_rms": False,
    "model_name": "custom",
    "use_attn_scale": True,
    "attn_scale": -1.0,
    "use_hook_mlp_in": False,
    "use_attn_in": False,
    "use_qk_norm": False,
    "clip_qkv": None,
    "use_logn_attn": False,
    "train_seq_length": None,
    "use_dynamic_ntk_rope": False,
    "use_local_attn": False,
    "ungroup_grouped_query_attention": False,
    "original_architecture": None,
    "from_checkpoint": False,
    "checkpoint_index": None,
    "checkpoint_label_type": None,
    "checkpoint_value": None,
    "tokenizer_name": None,
    "window_size": None,
    "attn_types": None,
    "init_mode": "gpt2",
    "n_devices": 1,
    "attention_dir": "causal",
    "seed": None,
    "initializer_range": -1.0,
    "init_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "d_vocab_out": -1,
    "parallel_attn_mlp": False,
    "rotary_dim": None,
    "n_params": None,
    "use_hook_tokens": False,
    "tokenizer_prepends_bos": None,
    "post_embedding_ln": False,
    "rotary_base": 10000,
    "rotary_base_local": None,
    "rotary_scaling_factor": 1.0,
    "trust_remote_code": False,
    "rotary_adjacent_pairs": False,
    "load_in_4bit": False,
    "quantization_method": None,
    "relative_attention_max_distance": None,
    "relative_attention_num_buckets": None,
    "decoder_start_token_id": None,
    "tie_word_embeddings": False,
    "use_normalization_before_and_after": False,
    "attn_scores_soft_cap": -1.0,
    "output_logits_soft_cap": -1.0,
    "use_NTK_by_parts_rope": False,
    "NTK_by_parts_low_freq_factor": 1.0,
    "NTK_by_parts_high_freq_factor": 4.0,
    "NTK_by_parts_factor": 8.0,
    "NTK_original_ctx_len": 8192,
    "use_yarn_rope": False,
    "yarn_factor": 1.0,
    "yarn_attention_factor": 1.0,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "yarn_original_max_position_embeddings": 4096,
    "yarn_truncate": True,
    "yarn_global_attn_only": False,
    "use_attention_sinks": False,
    "norm_topk_prob": False,
}


@dataclass(frozen=True)
class NativeCheckpoint:
    """A validated native checkpoint directory.

    Attributes:
        path: the directory (resolved).
        config: the file's ``HookedTransformerConfig`` fields, less :data:`PLACEMENT_FIELDS` and
            :data:`DROPPED_FIELDS` (what is passed to TransformerLens).
        state_dict: ``{HookedTransformer parameter name: tensor}`` on the CPU, as stored (buffers of
            :data:`BUFFER_SUFFIXES` removed).
    """

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    def where(self) -> str:
        """The directory, quoted, for error messages."""
        return repr(str(self.path))


def is_native_checkpoint(path: Path) -> bool:
    """Whether the directory ``path`` holds a native checkpoint (has :data:`CONFIG_FILE`)."""
    return (path / CONFIG_FILE).is_file()


def hooked_config_fields() -> frozenset[str]:
    """The field names of ``HookedTransformerConfig``: the class's own where TransformerLens has it
    (3.x), else the record :data:`HOOKED_CONFIG_DEFAULTS` (4.x)."""
    try:
        from transformer_lens import HookedTransformerConfig
    except ImportError:
        return frozenset(HOOKED_CONFIG_DEFAULTS) | {"d_model", "d_head", "n_layers", "n_ctx", "dtype"}
    return frozenset(f.name for f in dataclasses.fields(HookedTransformerConfig))


def is_buffer_key(key: str) -> bool:
    """Whether a state-dict entry is a buffer TransformerLens rebuilds (:data:`BUFFER_SUFFIXES`)."""
    return key.endswith(BUFFER_SUFFIXES)


def _read_config(path: Path) -> dict[str, Any]:
    where = repr(str(path))
    text = (path / CONFIG_FILE).read_bytes()
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"model directory {where}: {CONFIG_FILE} is not valid JSON ({exc}); it must be a JSON object of "
            'HookedTransformerConfig fields, e.g. {"n_layers": 2, "d_model": 48, "d_head": 12, '
            '"n_ctx": 85, "d_vocab": 128, "attn_only": true}'
        ) from exc
    if not isinstance(config, dict):
        raise ValueError(
            f"model directory {where}: {CONFIG_FILE} must hold a JSON object of HookedTransformerConfig "
            f"fields, got {type(config).__name__}"
        )
    unknown = sorted(set(config) - hooked_config_fields())
    if unknown:
        raise ValueError(
            f"model directory {where}: {CONFIG_FILE} sets {unknown}, which are not HookedTransformerConfig "
            "fields; remove them (the allowed fields are HookedTransformerConfig's, e.g. n_layers, d_model, "
            "n_heads, d_head, d_vocab, n_ctx, attn_only, normalization_type, act_fn)"
        )
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ValueError(
            f"model directory {where}: {CONFIG_FILE} must set {list(REQUIRED_FIELDS)} (the shapes of the "
            f"weights); missing: {missing}"
        )
    return {k: v for k, v in config.items() if k not in PLACEMENT_FIELDS + DROPPED_FIELDS}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    where = repr(str(path))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickled:
            raise ValueError(
                f"model directory {where}: its weights {pickled} are pickle files (torch.save), and "
                "unpickling can run arbitrary code, so qk_subspace never reads them. Convert them once, "
                "where you trust the file: safetensors.torch.save_file(torch.load(file, weights_only=True), "
                f"{str(weights)!r}), then load the directory again"
            )
        others = sorted(p.name for p in path.glob("*.safetensors"))
        found = f"; found {others}" if others else ""
        raise FileNotFoundError(
            f"model directory {where} has {CONFIG_FILE} but no {WEIGHTS_FILE}: a native checkpoint's "
            f"weights are one safetensors file of the HookedTransformer state dict{found} "
            "(write it with safetensors.torch.save_file(model.state_dict(), ...))"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"model directory {where}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})"
        ) from exc
    return {k: v for k, v in state_dict.items() if not is_buffer_key(k)}


def read_checkpoint(path: Path) -> NativeCheckpoint:
    """Read and validate the native checkpoint in ``path`` (nothing is unpickled).

    Raises:
        ValueError: the config file is not a JSON object, sets fields ``HookedTransformerConfig`` does
            not have or lacks :data:`REQUIRED_FIELDS`; the weights are pickle files only; the weights
            file is not safetensors.
        FileNotFoundError: no :data:`WEIGHTS_FILE` (and no pickled weights either).
    """
    path = path.resolve()
    return NativeCheckpoint(path=path, config=_read_config(path), state_dict=_read_weights(path))


def check_state_dict(
    checkpoint: NativeCheckpoint,
    expected: Mapping[str, tuple[int, ...]],
    ignorable: Mapping[str, str] | None = None,
) -> None:
    """Every weight ``expected`` (``{HookedTransformer name: shape}``) is in the file with that shape,
    and the file has nothing else but ``ignorable`` entries (``{name: why it may be left out}``).

    Raises:
        ValueError: naming the missing weights, the unexpected entries or the shape mismatches.
    """
    where = f"model directory {checkpoint.where()}: {WEIGHTS_FILE}"
    have = checkpoint.state_dict
    missing = sorted(k for k in expected if k not in have)
    if missing:
        raise ValueError(
            f"{where} lacks the weights {missing} that the HookedTransformer of {CONFIG_FILE} has; the file "
            "must hold the whole state dict (model.state_dict()), or the config does not describe it"
        )
    unexpected = sorted(k for k in have if k not in expected and k not in (ignorable or {}))
    if unexpected:
        raise ValueError(
            f"{where} has entries {unexpected} that the HookedTransformer of {CONFIG_FILE} does not have; "
            "the config does not describe these weights (check attn_only, normalization_type, gated_mlp, "
            "n_key_value_heads, positional_embedding_type)"
        )
    wrong = [
        f"{k}: {tuple(have[k].shape)} in the file, {tuple(shape)} expected"
        for k, shape in expected.items()
        if tuple(have[k].shape) != tuple(shape)
    ]
    if wrong:
        raise ValueError(f"{where}: shapes do not match {CONFIG_FILE}: " + "; ".join(wrong))


def check_processing(checkpoint: NativeCheckpoint, processing: dict[str, bool]) -> None:
    """Refuse weight processing TransformerLens cannot apply to this configuration, before building.

    Raises:
        ValueError: ``refactor_factored_attn_matrices=True`` on a rotary or grouped-query model.
    """
    if not processing.get("refactor_factored_attn_matrices"):
        return
    cfg = checkpoint.config
    kinds = []
    if cfg.get("positional_embedding_type", "standard") == "rotary":
        kinds.append("rotary positions (W_QK depends on the position)")
    if cfg.get("n_key_value_heads") is not None:
        kinds.append("grouped-query attention (n_key_value_heads)")
    if kinds:
        raise ValueError(
            f"model directory {checkpoint.where()}: refactor_factored_attn_matrices=True cannot be applied to "
            f"a model with {' and '.join(kinds)}; load it with refactor_factored_attn_matrices=False (the default)"
        )
