"""``load_model``: a packaged alias, a ``.gguf`` file, a local HF folder or a hub id -> (model, tokenizer).

GGUF files are dequantized by transformers at load time, which is slow-ish. For packaged aliases the
dequantized model and its tokenizer are therefore saved once as an HF folder
(``<cache>/models/<alias>-hf/``, safetensors) and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.models.packaged import resolve_model_path
from kvsqueeze.models.registry import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    PackagedModel,
    find_packaged,
    models_cache_dir,
)

logger = logging.getLogger(__name__)

# Hub ids are taken only in the namespaced ``org/name`` form, so a mistyped alias fails at once
# instead of waiting on the hub's retries.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_STAMP = "kvsqueeze-source.json"


def _aliases() -> str:
    return ", ".join(PACKAGED_MODELS)


def _unknown(name: str) -> ValueError:
    names = [*PACKAGED_MODELS, *(m.full_name.lower() for m in PACKAGED_MODELS.values())]
    close = difflib.get_close_matches(name.strip().lower(), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(
        f"unknown model {name!r}: not a packaged alias, .gguf file, model folder or hub id (org/name); "
        f"{hint}valid aliases: {_aliases()}"
    )


@contextlib.contextmanager
def _quiet_progress(progress: bool) -> Iterator[None]:
    """Hide transformers' progress bars (including the GGUF dequantizer's plain tqdm) unless ``progress``."""
    if progress:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original_tqdm is not None:
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _memoized_gguf_name_maps() -> Iterator[None]:
    """Cache ``gguf.get_tensor_name_map`` while loading a GGUF.

    transformers rebuilds the same name map for every module of the model (hundreds of times, ~10 s
    for SmolLM2); it depends only on (architecture, number of blocks), so one build per load suffices.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _from_pretrained(
    source: str | Path, *, dtype: torch.dtype, attn_implementation: str | None, gguf_file: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **extra, **attn)
    tokenizer = AutoTokenizer.from_pretrained(str(source), **extra)
    return model, tokenizer


def _load_gguf(
    path: Path, dtype: torch.dtype, attn_implementation: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with _memoized_gguf_name_maps():
        model, tokenizer = _from_pretrained(
            path.parent, dtype=dtype, attn_implementation=attn_implementation, gguf_file=path.name
        )
    try:
        _clear_gguf_quantizer(model)
    except RuntimeError as error:
        logger.info("keeping the GGUF quantizer of %s: %s", path.name, error)
    return model, tokenizer


def _hf_cache_folder(model: PackagedModel) -> Path:
    return models_cache_dir() / f"{model.alias}-hf"


def _hf_cache_valid(folder: Path, model: PackagedModel) -> bool:
    try:
        stamp = json.loads((folder / _CACHE_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("sha256") == model.sha256 and (folder / "config.json").is_file()


def _clear_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF model savable: its ``GgufHfQuantizer`` refuses serialization.

    The weights are already plain dense tensors (transformers dequantizes them when no GGUF kernel is
    installed), so dropping the quantizer and ``config.quantization_config`` loses nothing.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    config = getattr(quantizer, "quantization_config", None)
    packed = getattr(quantizer, "packed_modules", None)
    if packed or (getattr(quantizer, "supported", False) and not getattr(config, "dequantize", True)):
        raise RuntimeError(
            "the GGUF weights were kept packed (not dequantized); cannot save them as safetensors"
        )
    quantizer.remove_quantization_config(model)


def _save_hf_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, packaged: PackagedModel, folder: Path
) -> None:
    """Save ``model`` + ``tokenizer`` to ``folder`` via a temp folder renamed into place; warn on failure."""
    tmp: Path | None = None
    try:
        if getattr(model, "hf_quantizer", None) is not None:
            raise RuntimeError("the model still has its GGUF quantizer (weights kept packed)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stamp = {"alias": packaged.alias, "sha256": packaged.sha256, "transformers": transformers.__version__}
        (tmp / _CACHE_STAMP).write_text(json.dumps(stamp))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if _hf_cache_valid(folder, packaged):  # another process finished first
            return
        if folder.exists():  # stale or invalid: replace it
            shutil.rmtree(folder)
        tmp.rename(folder)
        tmp = None
    except Exception as error:  # the cache is an optimisation only
        logger.warning(
            "could not save %s as an HF folder in %s (%s); carrying on", packaged.alias, folder, error
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf_into_hf_cache(
    packaged: PackagedModel, folder: Path, attn_implementation: str | None, progress: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the verified GGUF dequantized (float32, the dtype the folder caches) and save it as ``folder``."""
    gguf_path = resolve_model_path(packaged, progress=progress)
    model, tokenizer = _load_gguf(gguf_path, torch.float32, attn_implementation)
    _save_hf_cache(model, tokenizer, packaged, folder)
    return model, tokenizer


def packaged_hf_folder(name: str, *, progress: bool = True) -> Path:
    """The HF folder (float32 safetensors + tokenizer) of packaged model ``name``, for tools that load by
    path (kvpress's pipeline, vLLM). Built from the verified GGUF the first time, as ``load_model`` does."""
    packaged = find_packaged(name)
    if packaged is None:
        raise _unknown(name)
    folder = _hf_cache_folder(packaged)
    if not _hf_cache_valid(folder, packaged):
        with _quiet_progress(progress):
            _load_gguf_into_hf_cache(packaged, folder, None, progress)
        if not _hf_cache_valid(folder, packaged):
            raise ValueError(f"could not save {packaged.alias} as an HF folder in {folder} (see the warning)")
    return folder


def hf_folder(name: str | None) -> Path:
    """The HF folder of ``name`` for tools that load by path (kvpress, vLLM): a packaged alias's folder (built
    once from its GGUF, :func:`packaged_hf_folder`) or a local HF folder; ``None`` is the default model."""
    name = name or DEFAULT_MODEL
    if find_packaged(name) is not None:
        return packaged_hf_folder(name)
    folder = Path(name)
    if (folder / "config.json").exists():
        return folder
    raise ValueError(f"{name!r} is neither a packaged model alias nor a local HF folder (with config.json)")


def _load_packaged(
    packaged: PackagedModel,
    *,
    dtype: torch.dtype,
    attn_implementation: str | None,
    progress: bool,
    use_hf_cache: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = _hf_cache_folder(packaged)
    if use_hf_cache and _hf_cache_valid(folder, packaged):
        try:
            return _from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
        except Exception as error:  # a damaged cache: rebuild it from the GGUF
            logger.warning("ignoring unreadable HF cache %s (%s)", folder, error)
    if not use_hf_cache:
        return _load_gguf(resolve_model_path(packaged, progress=progress), dtype, attn_implementation)
    # Dequantized GGUF weights are float32: cache those, then cast to the requested dtype.
    model, tokenizer = _load_gguf_into_hf_cache(packaged, folder, attn_implementation, progress)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tokenizer


def _load_by_name(
    name: str, *, dtype: torch.dtype, attn_implementation: str | None, progress: bool, use_hf_cache: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not name.strip():
        raise _unknown(name)
    packaged = find_packaged(name)
    if packaged is not None:
        return _load_packaged(
            packaged,
            dtype=dtype,
            attn_implementation=attn_implementation,
            progress=progress,
            use_hf_cache=use_hf_cache,
        )
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype, attn_implementation)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if path.exists():
        raise ValueError(f"{name!r} is neither a .gguf file nor a model folder with a config.json")
    if not _HUB_ID.match(name) or name.lower().endswith(".gguf"):
        raise _unknown(name)
    try:
        return _from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"model {name!r} could not be found locally or on the hub ({first_line}); "
            f"packaged aliases: {_aliases()}"
        ) from error


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
    progress: bool = True,
    use_hf_cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    ``name`` is, in order of precedence: a packaged alias or full name (any case, see
    ``PACKAGED_MODELS``); a path to a ``.gguf`` file; a local HF folder with a ``config.json``; a
    hub id in ``org/name`` form (needs network). Packaged models are verified against their SHA-256
    and, with ``use_hf_cache``, their dequantized weights are saved once as an HF folder in the cache
    (float32 safetensors) and loaded from it afterwards, which is many times faster than the GGUF.
    ``progress`` shows progress bars while assembling and loading.

    The model is in eval mode on ``device`` in ``dtype``; the tokenizer pads on the left and has a
    pad token (its EOS token if it had none). Raises ``ValueError`` (one line) for unknown names,
    missing weight packages (naming the pip command) and checksum mismatches.
    """
    with _quiet_progress(progress):
        model, tokenizer = _load_by_name(
            name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            progress=progress,
            use_hf_cache=use_hf_cache,
        )
    if model.dtype != dtype:
        model = model.to(dtype)
    model = model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
