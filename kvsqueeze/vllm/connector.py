"""``KVSqueezeConnector``: vLLM's KV connector API serving kvsqueeze's reuse store (import inside vLLM only).

Start vLLM with it (``kvsqueeze serve --engine vllm`` does; :func:`kvsqueeze.vllm.vllm_serve_command`)::

    vllm serve MODEL_DIR --enable-prefix-caching --kv-transfer-config '{"kv_connector": "KVSqueezeConnector",
        "kv_connector_module_path": "kvsqueeze.vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute"}'

The scheduler side plans each new request against what the workers store (:mod:`kvsqueeze.vllm.plan`):
a shared segment found in the prompt, with the exact rows of the prompt before it, is loaded into the
request's blocks, its keys turned by RoPE from where they were computed to where they now sit; vLLM computes
the rest. A request that got nothing loaded is computed by vLLM, and its worker keeps the rows later prompts
could load. Each worker (one per tensor-parallel rank, pipeline stage) stores the rows of its own KV heads and
layers, so the scheduler's plan is the same for every rank and no rank reads another's memory.

Options (``kv_connector_extra_config``): ``policy`` (``plain``, the default, or ``kvcomm``: KVCOMM's measured
offsets added to a reused document, see :class:`kvsqueeze.vllm.plan.ReuseIndex`; ``min_anchors``,
``max_anchors``), ``max_bytes`` (each worker's store bound, default 4 GiB; least recently used rows go
first; a load of rows that went is reported to vLLM, which recomputes them) and ``bits`` (2, 4 or 8: rows
stored quantized per token, dequantized when loaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from kvsqueeze.quantization.rope import key_rotations
from kvsqueeze.reuse.kvcomm import add_offsets, measured_offset, placeholder_delta
from kvsqueeze.reuse.rope_shift import shift_keys
from kvsqueeze.reuse.store import SegmentKV, SegmentStore
from kvsqueeze.vllm.paged import BlockLayout, check_layout, probe_layout, read_rows, slots_of, write_rows
from kvsqueeze.vllm.plan import (
    Keep,
    Placement,
    RequestPlan,
    ReuseIndex,
    anchor_key,
    shared_spans,
    truncate_loads,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

DEFAULT_MAX_BYTES = 4 * 2**30
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass
class LoadJob:
    """Rows to write into a request's slots before its first step."""

    req_id: str
    slots: torch.Tensor  # (T,)
    placements: list[Placement]


@dataclass
class KeepJob:
    """Rows a step computes for a request, to store under ``keep.key``."""

    req_id: str
    keep: Keep
    slots: torch.Tensor  # (T,)


@dataclass
class KVSqueezeMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    keeps: list[KeepJob] = field(default_factory=list)


@dataclass
class _Tracked:
    """The scheduler side's record of a live request."""

    ids: list[int]
    plan: RequestPlan
    block_ids: list[int] = field(default_factory=list)
    kept: list[Keep] = field(default_factory=list)  # handed to the workers


class KVSqueezeConnector(KVConnectorBase_V1):
    """Position-corrected KV reuse inside vLLM, plain or with KVCOMM's offsets (module doc).

    vLLM makes one instance in the scheduler process (``role`` SCHEDULER: plans requests, hands jobs to the
    workers in the step's metadata) and one per worker (``role`` WORKER: stores rows, writes loads into the
    paged cache).
    """

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if role == KVConnectorRole.SCHEDULER:
            self.index = ReuseIndex(
                extra.get("policy", "plain"),
                int(extra.get("min_anchors", 2)),
                int(extra.get("max_anchors", 20)),
            )
            self.requests: dict[str, _Tracked] = {}
            self.loading: list[tuple[set[int], list[str]]] = []  # the last step's loads: blocks, keys
            return
        bits = extra.get("bits")
        self.store = SegmentStore(int(extra.get("max_bytes", DEFAULT_MAX_BYTES)), bits=bits)
        self.origins: dict[str, int] = {}  # key -> the position its first row was computed at
        text_config = vllm_config.model_config.hf_text_config
        self.all_rotations = key_rotations(text_config)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.layer_names: list[str] = []
        self.rotations = []
        self.layout: BlockLayout | None = None
        self.saving: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.failed_blocks: set[int] = set()

    # ================================================================== scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        ids = list(request.prompt_token_ids or [])
        try:
            shared = shared_spans(request.kv_transfer_params, len(ids))
        except ValueError as err:
            logger.warning("request %s: %s; nothing of it is shared", request.request_id, err)
            shared = []
        plan = self.index.plan(ids, num_computed_tokens, shared)
        earlier = self.requests.get(request.request_id)  # asked again: not scheduled yet, or preempted
        self.requests[request.request_id] = _Tracked(ids, plan, kept=earlier.kept if earlier else [])
        return plan.loaded_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        tracked = self.requests.get(request.request_id)
        if tracked is not None and num_external_tokens != tracked.plan.loaded_tokens:
            tracked.plan.loads = truncate_loads(tracked.plan.loads, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVSqueezeMetadata()
        self.loading = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self.requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._load(meta, new.req_id, tracked)
            self._keep(meta, new.req_id, tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self.requests.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in cached.resumed_req_ids
            if new_blocks is not None:
                tracked.block_ids = (
                    list(new_blocks[0]) if resumed else tracked.block_ids + list(new_blocks[0])
                )
            if resumed:  # preempted: its blocks were freed, load again into the new ones
                self._load(meta, req_id, tracked)
            self._keep(meta, req_id, tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _load(self, meta: KVSqueezeMetadata, req_id: str, tracked: _Tracked) -> None:
        loads = tracked.plan.loads
        if not loads:
            return
        slots = slots_of(tracked.block_ids, self.block_size, loads[0].start, loads[-1].end)
        meta.loads.append(LoadJob(req_id, slots, list(loads)))
        self.loading.append((set(tracked.block_ids), [p.key for p in loads]))

    def _keep(self, meta: KVSqueezeMetadata, req_id: str, tracked: _Tracked, done: int) -> None:
        """Hand the workers the keeps whose rows this step completes (``done``: tokens computed after it)."""
        for keep in [k for k in tracked.plan.keeps if k.end <= done]:
            tracked.plan.keeps.remove(keep)
            tracked.kept.append(keep)
            slots = slots_of(tracked.block_ids, self.block_size, keep.start, keep.end)
            meta.keeps.append(KeepJob(req_id, keep, slots))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Forget rows a worker failed to load (its store let them go), so no later prompt plans on them."""
        failed = connector_output.invalid_block_ids
        for blocks, keys in self.loading if failed else ():
            if blocks & failed:
                for key in keys:
                    self.index.discard(key)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        tracked = self.requests.pop(request.request_id, None)
        if tracked is None:
            return False, None
        for keep in tracked.kept:
            self.index.add(keep, tracked.ids)
        return False, {"kvsqueeze": {"loaded_tokens": tracked.plan.loaded_tokens}}

    # ================================================================== worker side

    def _meta(self) -> KVSqueezeMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVSqueezeMetadata):
            raise TypeError(f"KVSqueezeConnector got {type(meta).__name__} from vLLM, not its own metadata")
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = {}
        for name, tensor in kv_caches.items():
            match = LAYER_INDEX.search(name)
            if match is None:
                raise ValueError(f"cannot tell the layer index of vLLM's KV cache {name!r}")
            check_layout(tensor, self.block_size)
            layers[name] = int(match.group(1))
        self.kv_caches = kv_caches
        self.layer_names = sorted(layers, key=layers.get)
        self.rotations = [self.all_rotations[layers[name]] for name in self.layer_names]
        first = kv_caches[self.layer_names[0]]
        self.layout = cpu_block_layout(self._vllm_config, self.block_size, first.shape[3] // 2, first.dtype)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        for job in self._meta().loads:
            parts = [self._placed(p) for p in job.placements]
            if any(part is None for part in parts):
                self.failed_blocks.update((job.slots // self.block_size).tolist())  # a slot's block id
                logger.warning("request %s: stored rows are gone; vLLM recomputes them", job.req_id)
                continue
            keys = torch.cat([k for k, _ in parts], dim=2)  # (L, H_kv, T, D)
            values = torch.cat([v for _, v in parts], dim=2)
            for i, name in enumerate(self.layer_names):
                write_rows(self.kv_caches[name], job.slots, keys[i], values[i], self.layout)

    def _placed(self, placement: Placement) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored rows of ``placement`` with keys turned to its positions (and KVCOMM's offsets added
        when it names anchors), (L, H_kv, T, D) each; ``None`` when the store no longer holds them."""
        first, end = placement.rows
        kv = self._at(placement.key, placement.start - first)
        if kv is None:
            return None
        if placement.anchors:
            kv = self._corrected(kv, placement)
        return kv.keys[:, :, first:end], kv.values[:, :, first:end]

    def _at(self, key: str, start: int) -> SegmentKV | None:
        """All stored rows of ``key`` placed from position ``start`` (keys turned from where they were
        computed; not turned at all when that is ``start``, so they load bit for bit)."""
        kv = self.store.get(key)
        if kv is None:
            return None
        origin = self.origins[key]
        keys = kv.keys if start == origin else shift_keys(kv.keys, origin, start, self.rotations)
        return SegmentKV(keys, kv.values)

    def _corrected(self, kv: SegmentKV, placement: Placement) -> SegmentKV:
        """``kv`` (placed) plus the anchors' offsets for ``placement.agent``, blended (KVCOMM)."""
        start = placement.start - placement.rows[0]
        bases, offsets = [], []
        for anchor in placement.anchors:
            base, offset = self._at(anchor, start), self.store.get(anchor_key(anchor, placement.agent))
            if base is not None and offset is not None:
                bases.append(base)
                offsets.append(offset)
        if not bases:
            return kv  # the store let the anchors go: plain reuse
        return add_offsets(kv, placeholder_delta(kv, bases, offsets))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are written whole in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        for j, job in enumerate(self._meta().keeps):
            self.saving.setdefault(j, {})[layer_name] = read_rows(kv_layer, job.slots, self.layout)

    def wait_for_save(self) -> None:
        for j, job in enumerate(self._meta().keeps):
            rows = self.saving.pop(j, {})
            if len(rows) != len(self.layer_names):
                continue  # this rank computed no attention for it (nothing to keep)
            keys = torch.stack([rows[name][0] for name in self.layer_names])  # (L, H_kv, T, D)
            values = torch.stack([rows[name][1] for name in self.layer_names])
            kv = SegmentKV(keys, values)
            if job.keep.kind == "anchor":
                # KVCOMM's measured offset: what vLLM computed minus the rows reuse would have placed there
                base = self._at(job.keep.base, job.keep.start)
                if base is None:
                    continue
                kv = measured_offset(kv, base)
            ids = torch.zeros(job.keep.end - job.keep.start, dtype=torch.int32)  # the plan holds the tokens
            if self.store.put(job.keep.key, ids, kv):
                self.origins[job.keep.key] = job.keep.start
        self.saving.clear()

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed


def cpu_block_layout(
    vllm_config: VllmConfig, block_size: int, head_dim: int, dtype: torch.dtype
) -> BlockLayout:
    """How the CPU backend's cache-write op arranges a block, for this model's dtype and head size."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(
        vllm_config.model_config.dtype, block_size, head_dim, vllm_config.cache_config.cache_dtype
    )

    def write(key, value, key_cache, value_cache, slots):
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    return probe_layout(write, block_size, head_dim, dtype)
