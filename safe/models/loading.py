"""One loading path for hub ids and local folders, with a one-sentence error when a model is missing.

Hub ids and local paths both go through ``from_pretrained``; tests exercise this code offline with
tiny models saved by ``save_pretrained``. A checkpoint that loads with missing weights is refused
instead of silently running with random weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from safe.core.errors import SafeError


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


def looks_like_path(name: str) -> bool:
    """A hub id is "org/name"; anything absolute, relative-looking or existing is a local path."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 \
        or os.sep != "/" and os.sep in name


@contextlib.contextmanager
def _quiet_transformers():
    # The load report of a partial checkpoint (e.g. CLAP text tower we skip) is noise for users.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def missing_model_error(name: str, what: str, flag: str, exc: Exception | None = None) -> SafeError:
    if looks_like_path(name):
        return SafeError(f"The {what} folder '{name}' does not exist or holds no usable model; "
                         f"pass a folder written by save_pretrained with {flag} PATH.")
    where = "is not in the local Hugging Face cache and the hub is offline" if _offline() \
        else "could not be downloaded from the Hugging Face hub"
    return SafeError(f"The {what} '{name}' {where}; download it once with network access or pass a local "
                     f"copy with {flag} PATH.")


def load_pretrained(cls, name: str, *, what: str, flag: str, allow_unused: bool = False, **kwargs):
    """``cls.from_pretrained(name, **kwargs)`` with SAFE's errors; refuses missing weights."""
    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        raise missing_model_error(name, what, flag)
    source = str(path) if path.exists() else name
    try:
        with _quiet_transformers():
            result = cls.from_pretrained(source, **kwargs)
    except SafeError:
        raise
    except Exception as exc:
        if path.exists():
            # A local folder that exists but is not this kind of model (wrong folder, other architecture).
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise SafeError(f"The {what} folder '{name}' could not be loaded as {cls.__name__} ({detail}); "
                            f"pass the right folder with {flag} PATH.") from exc
        if isinstance(exc, (OSError, ValueError)) or \
                type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise missing_model_error(name, what, flag, exc) from exc
        raise
    return result


def load_model(cls, name: str, *, what: str, flag: str, dtype=None, device=None):
    """Load a model, check that every weight came from the checkpoint, and put it on ``device``."""
    kwargs = {"output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model, info = load_pretrained(cls, name, what=what, flag=flag, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("num_batches_tracked")]
    if missing:
        raise SafeError(f"The {what} '{name}' is not a {cls.__name__} checkpoint ({len(missing)} weights missing, "
                        f"e.g. {missing[0]}); pass the right model with {flag} PATH.")
    if device is not None:
        model = model.to(device)
    return model.eval()


def default_dtype(device: torch.device | str | None) -> torch.dtype:
    """bf16 on GPU (how LLaVA-1.5 runs), fp32 on CPU where bf16 matmuls are slow and inexact."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
