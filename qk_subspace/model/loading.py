"""Load a TransformerLens model by official name (online) or from a local checkpoint (fully offline).

``backend="auto" | "hooked" | "bridge"`` chooses the TransformerLens class (:mod:`.backends`):
``HookedTransformer`` (TransformerLens 3.x) or ``TransformerBridge`` (3.x and 4.x) in compatibility mode
with the same weight processing. Everything else -- which checkpoints load offline, what is refused,
the errors -- is the same for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import backends, native
from .embedded import EMBEDDED_DIR, EMBEDDED_NAME, is_embedded_name

__all__ = ["DEFAULT_PROCESSING", "SUPPORTED_LOCAL_ARCHITECTURES", "hub_reachable", "load_model"]

#: Hugging Face architectures whose local checkpoints load offline (both backends).
SUPPORTED_LOCAL_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "GPTNeoForCausalLM",
    "OPTForCausalLM",
    "Qwen2ForCausalLM",
)

#: TransformerLens' default weight processing in ``HookedTransformer.from_pretrained`` (on a bridge, the
#: arguments of ``enable_compatibility_mode``).
DEFAULT_PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}

#: Hub organisations whose TransformerLens checkpoints are pickled ``.pth`` files.
_PICKLED_REPOS = ("NeelNanda/", "ArthurConmy/", "Baidicoot/")

_OFFLINE_HINT = (
    "Offline, give a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files; "
    "transformers' save_pretrained writes one) or the embedded model 'stories260K'."
)
#: ``model_source`` recorded for the embedded model.
EMBEDDED_SOURCE = "embedded in qk_subspace (llama2.c, MIT licence)"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (``False`` at once when ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache-layout error means "not cached"
        return False


def _processing(overrides: dict[str, Any]) -> dict[str, bool]:
    unknown = set(overrides) - set(DEFAULT_PROCESSING)
    if unknown:
        raise TypeError(
            f"load_model: unknown processing option(s) {sorted(unknown)}; allowed: {sorted(DEFAULT_PROCESSING)}"
        )
    return {**DEFAULT_PROCESSING, **{k: bool(v) for k, v in overrides.items()}}


def _record(model: Any, source: str, processing: dict[str, bool], offline: bool) -> Any:
    # Plain attributes on the module (not parameters or buffers): what was loaded and how.
    object.__setattr__(model, "qk_subspace_source", source)
    object.__setattr__(model, "qk_subspace_processing", dict(processing))
    object.__setattr__(model, "qk_subspace_offline", offline)
    object.__setattr__(model, "qk_subspace_backend", backends.name_of(model))
    model.eval()
    return model


def _load_local(
    path: Path,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: dict[str, bool],
    tokenizer: Any,
    backend: str,
) -> Any:
    from transformers import AutoModelForCausalLM

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no config.json; a local checkpoint needs config.json, "
            "weights (*.safetensors or pytorch_model.bin) and, for text input, tokenizer files (or, "
            f"TransformerLens-native, {native.CONFIG_FILE} and {native.WEIGHTS_FILE})"
        )
    try:
        hf_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"model directory {str(path)!r}: config.json is not valid JSON ({exc}); it must be a Hugging Face "
            "config (a JSON object with 'architectures')"
        ) from exc
    if not isinstance(hf_config, dict):
        raise ValueError(
            f"model directory {str(path)!r}: config.json must hold a JSON object, got {type(hf_config).__name__}"
        )
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_LOCAL_ARCHITECTURES:
        raise ValueError(
            f"model directory {str(path)!r}: architecture {arch!r} (config.json 'architectures') is not "
            f"supported for offline loading; supported: {list(SUPPORTED_LOCAL_ARCHITECTURES)}"
        )
    if backend == "hooked" and arch == "GPT2LMHeadModel" and "n_ctx" not in hf_config:
        raise ValueError(
            f"model directory {str(path)!r}: a GPT-2 config.json needs 'n_ctx' (TransformerLens reads it); "
            f'add "n_ctx": {hf_config.get("n_positions", 1024)} to config.json'
        )
    has_safetensors = any(path.glob("*.safetensors"))
    # Both routes avoid unpickling arbitrary objects: safetensors, or a pytorch_model.bin read by
    # transformers with torch.load(weights_only=True). No custom code from the directory is run.
    with _quiet_transformers():
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=has_safetensors,
            weights_only=True,
            trust_remote_code=False,
        )
    hf_model.eval()
    tokenizer = _local_tokenizer(path, tokenizer)
    with _quiet_transformers():
        return backends.of(backend).from_hf_model(path, hf_model, tokenizer, device, dtype, processing)


def _local_tokenizer(path: Path, tokenizer: Any) -> Any:
    """``tokenizer`` (an object, or a directory read locally), else the tokenizer files in ``path``, else None."""
    if tokenizer is None and any(
        (path / f).exists()
        for f in ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")
    ):
        tokenizer = path
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True, trust_remote_code=False)


def _load_native(
    path: Path,
    device: str | torch.device | None,
    dtype: torch.dtype,
    processing: dict[str, bool],
    tokenizer: Any,
    backend: str,
) -> Any:
    """A TransformerLens-native checkpoint (:mod:`.native`): safetensors only, never a pickle."""
    checkpoint = native.read_checkpoint(path)
    native.check_processing(checkpoint, processing)
    tokenizer = _local_tokenizer(path, tokenizer)
    return backends.of(backend).from_native(checkpoint, tokenizer, device, dtype, processing)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers for the small local checkpoints read here."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _unsafe_official_reason(official: str, backend: str) -> str | None:
    """Why TransformerLens would run code from the hub to load ``official``, or None."""
    if official.startswith(_PICKLED_REPOS):
        return "its weights are a pickled .pth file that TransformerLens reads with torch.load(weights_only=False)"
    if backends.of(backend).needs_remote_code(official):
        return "TransformerLens loads it with trust_remote_code=True (Python code from the hub repository)"
    return None


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    backend: str = "auto",
    **processing: bool,
) -> Any:
    """Load a TransformerLens model: a ``HookedTransformer`` or a ``TransformerBridge``.

    Args:
        name_or_path: ``"stories260K"``, the model embedded in the package
            (:mod:`qk_subspace.model.embedded`); an official TransformerLens name (``"gpt2"``,
            ``"gpt2-medium"``, ...), loaded with ``HookedTransformer.from_pretrained`` (needs the hub or
            its cache), with ``@STEP`` a checkpoint by training step (``"pythia-70m@1000"``:
            ``checkpoint_value=1000``, Pythia and the other models TransformerLens has checkpoints of);
            or a local checkpoint directory, loaded with no network access at all: a Hugging Face
            checkpoint (``config.json``, weights, tokenizer files) or a TransformerLens-native one
            (``hooked_transformer_config.json``, a JSON object of ``HookedTransformerConfig`` fields, and
            ``model.safetensors``, a ``HookedTransformer`` state dict; see :mod:`qk_subspace.model.native`;
            it takes precedence when a directory has both configs). Native weights are read from
            safetensors only: pickled ``*.pt``/``*.pth``/``*.bin`` weights are refused, never unpickled.
        device: ``"cpu"``, ``"cuda"``, ... (default: TransformerLens' choice).
        dtype: parameter dtype (default float32).
        tokenizer: optional tokenizer object or directory (local checkpoints without tokenizer files; a
            native checkpoint without either has no tokenizer and takes token ids).
        trust_remote_code: official names whose loading executes code from the hub -- the legacy
            TransformerLens models stored as pickled ``.pth`` files (``solu-*``, ``gelu-*``,
            ``attn-only-*``, ...) and the models TransformerLens loads with remote code (Qwen-1,
            phi-2, ...) -- are refused unless this is True. Local directories never run code from
            the directory and never unpickle arbitrary objects, whatever this says.
        backend: ``"auto"`` (``HookedTransformer`` on TransformerLens 3.x, ``TransformerBridge`` on 4.x),
            ``"hooked"`` or ``"bridge"`` (:mod:`qk_subspace.model.backends`). The bridge wraps the Hugging
            Face model in compatibility mode with the same processing; results are the same.
        **processing: TransformerLens weight processing, default as in ``from_pretrained``:
            ``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``
            (all True) and ``refactor_factored_attn_matrices`` (False).

    Returns:
        The model in eval mode, with ``model.qk_subspace_processing`` (the processing used),
        ``model.qk_subspace_source`` and ``model.qk_subspace_backend`` recorded on it, and
        ``model.qk_subspace_load_arguments`` (this call's arguments, so that another process -- a
        worker of :mod:`qk_subspace.execution` -- can load the same model; absent with a tokenizer object).

    Raises:
        FileNotFoundError / ValueError: a local directory without config.json, or of an
            unsupported architecture; a native checkpoint without model.safetensors, with pickled
            weights only, an invalid or unknown configuration field, or weights that do not match it
            (missing, unexpected, wrong shape); on the bridge, a native configuration it cannot
            compute as ``HookedTransformer`` does.
        ValueError: a name that is neither a local directory nor a TransformerLens model name.
        ConnectionError: an official name that is not cached while the hub is unreachable.
        ValueError: an official name whose loading runs code from the hub, without
            ``trust_remote_code=True``.
        TypeError: ``dtype`` that is not a floating-point ``torch.dtype``.
        ValueError: an unknown ``backend``, or ``"hooked"`` on TransformerLens 4.
    """
    proc = _processing(processing)
    which = backends.resolve(backend)
    model = _load(name_or_path, device, dtype, tokenizer, trust_remote_code, which, proc)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):  # what another process can repeat
        how = {
            "name_or_path": _absolute(name_or_path),
            "device": None if device is None else str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "tokenizer": None if tokenizer is None else str(tokenizer),
            "trust_remote_code": trust_remote_code,
            "backend": which,
            **processing,
        }
        object.__setattr__(model, "qk_subspace_load_arguments", how)
    return model


def _absolute(name_or_path: str | os.PathLike) -> str:
    """A local directory as an absolute path (another process may start elsewhere); a name as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() and not is_embedded_name(name_or_path) else str(name_or_path)


def _load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None,
    dtype: torch.dtype,
    tokenizer: Any,
    trust_remote_code: bool,
    which: str,
    proc: dict[str, bool],
) -> Any:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64, torch.bfloat16, ...), "
            f"got {dtype!r}"
        )
    if is_embedded_name(name_or_path):
        model = _load_local(EMBEDDED_DIR, device, dtype, proc, tokenizer, which)
        object.__setattr__(model, "qk_subspace_embedded", EMBEDDED_NAME)
        return _record(model, EMBEDDED_SOURCE, proc, offline=True)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        load = _load_native if native.is_native_checkpoint(path) else _load_local
        model = load(path, device, dtype, proc, tokenizer, which)
        return _record(model, str(path.resolve()), proc, offline=True)
    name, step = split_checkpoint(str(name_or_path))
    if step is not None and which != "hooked":
        raise ValueError(
            f"{name_or_path!r}: checkpoints by training step (NAME@STEP) load through HookedTransformer's "
            "checkpoint_value; use backend='hooked' (--backend hooked, transformer-lens 3.x)"
        )
    if path.suffix or (os.sep in name and not name.count("/") == 1):
        raise FileNotFoundError(f"model directory {name!r} does not exist. {_OFFLINE_HINT}")
    try:
        official = backends.of(which).official_name(name)
    except ValueError as exc:
        raise ValueError(
            f"{name!r} is neither a local directory nor a TransformerLens model name. {_OFFLINE_HINT}"
        ) from exc
    unsafe = _unsafe_official_reason(official, which)
    if unsafe is not None and not trust_remote_code:
        raise ValueError(
            f"refusing to load {name!r} ({official}): {unsafe}, which can execute arbitrary code. "
            "If you trust that repository, pass trust_remote_code=True (allowed: True/False, default False)"
        )
    if not _hub_cached(official) and not hub_reachable():
        raise ConnectionError(
            f"cannot load {name!r} ({official}): it is not in the local Hugging Face cache and the hub "
            f"is unreachable (offline). {_OFFLINE_HINT}"
        )
    extra = {} if step is None else {"checkpoint_value": step}
    model = backends.of(which).from_official(name, device, dtype, tokenizer, proc, trust_remote_code, **extra)
    return _record(model, official if step is None else f"{official}@{step}", proc, offline=False)


def split_checkpoint(name: str) -> tuple[str, int | None]:
    """``"pythia-70m@1000"`` -> ``("pythia-70m", 1000)`` (a training step); other names -> ``(name, None)``."""
    base, sep, step = name.rpartition("@")
    if sep and base and step.isdigit():
        return base, int(step)
    return name, None
