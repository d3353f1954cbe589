"""NVIDIA kvpress as a baseline: its own virtual environment, and a JSON bridge to a worker running in it.

kvpress 0.5.5 pins ``transformers<5.3`` while kvsqueeze needs 5.24, so kvpress cannot be imported here.
:func:`ensure_kvpress_env` builds a separate venv (once) and :func:`run_kvpress` drives
``kvpress_worker.py`` in it through a request file and a result file.

Keep ratios: kvsqueeze speaks of the fraction of the cache KEPT (``keep_ratio``); kvpress's
``compression_ratio`` is the fraction REMOVED, so ``compression_ratio = 1 - keep_ratio`` (nudged down
by a float ulp when needed so kvpress keeps ``int(n * keep_ratio)`` entries, see
:func:`compression_ratio_for`).

Prompts follow kvpress's pipeline: the context (chat-templated up to the end of the user turn) is
prefilled and compressed; then ``SEPARATOR + question``, the template's closing tokens and the answer
prefix are fed. ``query_aware`` requests put the question into the compressed context instead.

Result rows carry ``ROW_FIELDS``: ``prefill_seconds`` covers the context prefill and the compression
(KVzip's reconstruction passes included), ``decode_seconds`` the question plus the greedy tokens
(``step_seconds``: the one-token steps alone), ``cache_bytes`` the key and value tensors right after
compression, ``kl`` / ``top1_agreement`` compare teacher-forced next-token distributions with the
uncompressed run (``None`` without ``teacher_ids``).
Extra fields: ``context_tokens``, ``effective_cache_bytes`` (minus masked entries), ``teacher_agreement``
(argmax equals the teacher token), ``prefill_shared`` (see below) and, for presses that mask instead of
dropping (AdaKV, KVzip), a ``note``: their ``cache_bytes`` stay those of the full cache. A failing press
gives a row with ``error`` (and only ``id``, ``press``, ``keep_ratio``, ``full_cache_bytes``).

Prefill once, compress many (the job's ``share``, on by default; each recipe's ``share`` says how):
kvpress presses compress in a hook after each layer's attention, so the prefill's hidden states are
the same whatever the press. Presses with ``share="prefill"`` (whose class keeps kvpress's stock hook)
are all fed by one prefill per attention implementation, the full row's own for the default one; their
``prefill_seconds`` is that pass's time without the compress calls plus their own compress calls, i.e.
what their standalone prefill costs, and the full row's is the pass without any compress calls.
``share="scores"`` (KVzip) scores once through the press's own context manager and re-prunes those
ratio-free scores per keep ratio; all its rows report the one real run's ``prefill_seconds`` (the
scoring passes dominate, pruning is a top-k). Rows whose prefill served other rows too (the full row's
included) say ``"prefill_shared": true``, the others ``false``. With ``share=False`` every (press,
ratio) gets its own prefill, as kvpress's pipeline would run it.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvsqueeze.models import cache_dir
from kvsqueeze.venvs import clean_env, create_venv, is_ready, last_line, pip_install, run_step, venv_python

KVPRESS_VERSION = "0.5.5"
KVPRESS_TRANSFORMERS = "5.2.0"
KVPRESS_TORCH = "2.13.0"  # installed first: an unpinned torch pulls a multi-GB CUDA build
WORKER = Path(__file__).with_name("kvpress_worker.py")
MARKER = "kvsqueeze-kvpress.json"
SETTINGS = ("query_agnostic", "query_aware")
SEPARATOR = "\n\n"  # between context and question, in both settings
SHARE_MODES = ("prefill", "scores", None)


@dataclass(frozen=True)
class PressRecipe:
    """How the worker builds a kvpress press: ``cls(**kwargs, compression_ratio=...)``.

    With ``inner``, ``cls`` wraps the inner press (``cls(press=inner, **kwargs)``) and the ratio goes to
    the inner one. ``attn_implementation`` is switched to for this press only. ``masks`` marks presses
    that mask evicted keys instead of dropping them: their cache tensors keep full size.

    ``share`` says what the worker may run once for several presses and ratios: ``"prefill"`` (the
    default) lets the press ride on a prefill shared with the other such presses, provided its class
    uses kvpress's stock ``BasePress`` hook (the worker checks, and runs it alone otherwise);
    ``"scores"`` runs the press once and re-prunes its ratio-free ``score_val`` per ratio with
    ``compress_post`` (KVzip); ``None`` gives every ratio its own prefill.
    """

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    inner: PressRecipe | None = None
    attn_implementation: str | None = None
    masks: bool = False
    share: str | None = "prefill"

    def __post_init__(self) -> None:
        if self.share not in SHARE_MODES:
            raise ValueError(f"share must be one of {SHARE_MODES}, got {self.share!r}")

    def to_json(self) -> dict[str, Any]:
        """The recipe as plain JSON data (what the worker reads)."""
        return asdict(self)


KVPRESS_PRESSES: dict[str, PressRecipe] = {
    "snapkv": PressRecipe("SnapKVPress"),
    "streaming_llm": PressRecipe("StreamingLLMPress"),
    "expected_attention": PressRecipe("ExpectedAttentionPress"),
    "knorm": PressRecipe("KnormPress"),
    "tova": PressRecipe("TOVAPress"),
    # Scores with the attention weights the layer returns, which only eager attention computes.
    "observed_attention": PressRecipe("ObservedAttentionPress", attn_implementation="eager"),
    "pyramidkv": PressRecipe("PyramidKVPress"),
    "adakv_snapkv": PressRecipe("AdaKVPress", inner=PressRecipe("SnapKVPress"), masks=True),
    # Scores by replaying the context (2-3 prefills); only compress_post depends on the ratio.
    "kvzip": PressRecipe("KVzipPress", masks=True, share="scores"),
    "kvzip_plus": PressRecipe(
        "KVzipPress", {"kvzip_plus_normalization": True}, masks=True, share="scores"
    ),  # KVzip+, the KVzap paper's teacher
}

REQUEST_FIELDS: dict[str, type] = {
    "id": str,
    "context": str,
    "question": str,
    "answer_prefix": str,
    "max_new_tokens": int,
    "setting": str,
}
ROW_FIELDS = (
    "id",
    "press",
    "keep_ratio",
    "prediction",
    "prefill_seconds",
    "decode_seconds",
    "new_tokens",
    "cache_bytes",
    "full_cache_bytes",
    "kl",
    "top1_agreement",
)


def compression_ratio_for(keep_ratio: float) -> float:
    """kvpress's ``compression_ratio`` (fraction removed) for a kvsqueeze keep ratio in (0, 1].

    ``1 - keep_ratio``, lowered by a few ulps if float rounding would make ``1 - ratio`` fall below
    ``keep_ratio`` (kvpress keeps ``int(n * (1 - ratio))`` entries).
    """
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep ratio must be a number in (0, 1], got {keep_ratio!r}")
    ratio = 1.0 - float(keep_ratio)
    while ratio > 0 and 1.0 - ratio < keep_ratio:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def default_env_path() -> Path:
    """Where the kvpress venv lives unless told otherwise: ``<kvsqueeze cache>/kvpress-venv``."""
    return cache_dir() / "kvpress-venv"


def _expected_marker() -> dict[str, str]:
    return {"kvpress": KVPRESS_VERSION, "transformers": KVPRESS_TRANSFORMERS, "torch": KVPRESS_TORCH}


def ensure_kvpress_env(path: Path | None = None, *, progress: bool = True) -> Path:
    """Create (once) a venv with kvpress, its transformers and our torch; return its python.

    Installs ``torch==KVPRESS_TORCH`` first, then ``kvpress==KVPRESS_VERSION`` and
    ``transformers==KVPRESS_TRANSFORMERS`` with their dependencies. A marker file records the versions
    once everything imported; a venv whose marker matches is reused as is.
    """
    path = Path(path) if path is not None else default_env_path()
    if is_ready(path, MARKER, _expected_marker()):
        return venv_python(path)
    marker = path / MARKER
    steps = [
        [f"torch=={KVPRESS_TORCH}"],
        [f"kvpress=={KVPRESS_VERSION}", f"transformers=={KVPRESS_TRANSFORMERS}"],
    ]
    python = create_venv(path, "kvpress", progress)
    marker.unlink(missing_ok=True)
    for packages in steps:
        pip_install(python, packages, progress=progress)
    check = "import kvpress, transformers, torch, importlib.metadata as m; "
    check += "print(m.version('kvpress'), transformers.__version__, torch.__version__.split('+')[0])"
    found = run_step([str(python), "-c", check], "importing kvpress in its venv").split()
    if found != list(_expected_marker().values()):
        raise ValueError(
            f"the kvpress venv has kvpress/transformers/torch {'/'.join(found)}, expected "
            f"{'/'.join(_expected_marker().values())}"
        )
    marker.write_text(json.dumps(_expected_marker()))
    return python


def check_requests(requests: list[dict[str, Any]]) -> None:
    """One-line ValueError unless every request has the fields the worker needs, of the right types."""
    if not isinstance(requests, list) or not requests:
        raise ValueError("requests must be a non-empty list of dicts")
    seen: set[str] = set()
    for i, request in enumerate(requests):
        if not isinstance(request, dict):
            raise ValueError(f"request {i} is not a dict")
        for key, kind in REQUEST_FIELDS.items():
            if key == "setting" and key not in request:
                continue
            value = request.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"request {i}: {key!r} must be {kind.__name__}, got {value!r}")
        if request["max_new_tokens"] < 1:
            raise ValueError(f"request {i}: max_new_tokens must be >= 1")
        if request.get("setting", "query_agnostic") not in SETTINGS:
            raise ValueError(f"request {i}: setting must be one of {', '.join(SETTINGS)}")
        teacher = request.get("teacher_ids")
        if teacher is not None and not (
            isinstance(teacher, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in teacher)
        ):
            raise ValueError(f"request {i}: teacher_ids must be a list of token ids")
        if request["id"] in seen:
            raise ValueError(f"request id {request['id']!r} appears twice")
        seen.add(request["id"])


def build_job(
    model_dir: Path,
    requests: list[dict[str, Any]],
    presses: list[str],
    keep_ratios: list[float],
    num_threads: int | None = None,
    share: bool = True,
) -> dict[str, Any]:
    """The request JSON the worker reads (validated); ``share=False`` gives every press its own prefill."""
    unknown = [p for p in presses if p not in KVPRESS_PRESSES]
    if unknown:
        raise ValueError(f"unknown kvpress press {unknown[0]!r}; choose from {', '.join(KVPRESS_PRESSES)}")
    if len(set(presses)) != len(presses):
        raise ValueError("presses must not repeat")
    if not keep_ratios:
        raise ValueError("keep_ratios must not be empty")
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    check_requests(requests)
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    return {
        "model_dir": str(Path(model_dir).resolve()),
        "requests": requests,
        "presses": {name: KVPRESS_PRESSES[name].to_json() for name in presses},
        "ratios": [{"keep": float(k), "compression_ratio": compression_ratio_for(k)} for k in keep_ratios],
        "separator": SEPARATOR,
        "num_threads": num_threads,
        "share": bool(share),
    }


def check_result(result: dict[str, Any], job: dict[str, Any]) -> None:
    """One-line ValueError unless the worker returned one well-formed row per expected combination."""
    for key in ("kvpress_version", "transformers_version", "torch_version", "rows"):
        if key not in result:
            raise ValueError(f"the kvpress worker's result has no {key!r}")
    expected = len(job["requests"]) * (1 + len(job["presses"]) * len(job["ratios"]))
    if len(result["rows"]) != expected:
        raise ValueError(f"the kvpress worker returned {len(result['rows'])} rows, expected {expected}")
    for row in result["rows"]:
        needed = ("id", "press", "keep_ratio", "error") if "error" in row else ROW_FIELDS
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"a kvpress result row lacks {', '.join(missing)}")


def run_kvpress(
    model_dir: Path,
    requests: list[dict[str, Any]],
    *,
    presses: list[str],
    keep_ratios: list[float],
    python: Path | None = None,
    timeout: float | None = None,
    progress: bool = False,
    num_threads: int | None = None,
    share: bool = True,
) -> dict[str, Any]:
    """Run kvpress ``presses`` at ``keep_ratios`` on ``requests`` with the HF model in ``model_dir``.

    Each request: ``id``, ``context``, ``question``, ``answer_prefix``, ``max_new_tokens``, optional
    ``setting`` ("query_agnostic", the default, or "query_aware") and ``teacher_ids``. Returns
    ``{"kvpress_version", "transformers_version", "torch_version", "rows"}`` with a ``"full"`` row per
    request and a row per (request, press, keep ratio); a press that fails gives a row with ``error``.
    ``python`` is the kvpress venv's interpreter (default: :func:`ensure_kvpress_env`); ``progress``
    lets the worker's per-press log lines through to stderr; ``num_threads`` sets torch's CPU threads
    in the worker (match the kvsqueeze side for fair timings); ``share=False`` turns prefill sharing
    off (one prefill per press and ratio, see the module docstring).
    """
    job = build_job(model_dir, requests, presses, keep_ratios, num_threads, share)
    python = Path(python) if python is not None else ensure_kvpress_env(progress=progress)
    with tempfile.TemporaryDirectory(prefix="kvpress-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(job))
        # -I: neither this folder (its datasets.py would shadow the package) nor user site on sys.path
        cmd = [str(python), "-I", str(WORKER), str(request_file), str(result_file)]
        try:
            proc = subprocess.run(
                cmd,
                env=clean_env(),
                timeout=timeout,
                stdout=subprocess.PIPE,
                stderr=None if progress else subprocess.PIPE,
                text=True,
            )
        except subprocess.TimeoutExpired:
            raise ValueError(f"the kvpress worker did not finish within {timeout} s") from None
        if proc.returncode != 0 or not result_file.exists():
            reason = last_line(proc.stderr or "") if not progress else "see its output above"
            raise ValueError(f"the kvpress worker failed (exit {proc.returncode}): {reason}")
        result = json.loads(result_file.read_text())
    check_result(result, job)
    return result
