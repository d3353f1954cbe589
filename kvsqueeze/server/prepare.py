"""From a validated request body to a :class:`GenerationRequest`: method, budget, sampling, limits, tokens.

Every check a client can fail happens here, before the request reaches the engine, and raises a 400
:class:`~kvsqueeze.server.errors.APIError` with a one-line message (``param`` names the field).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.cache.budget import Budget
from kvsqueeze.generation import check_prompt_length
from kvsqueeze.methods import Method, get_method
from kvsqueeze.server.engine.prefix import QUERY_AGNOSTIC
from kvsqueeze.server.engine.request import GenerationRequest
from kvsqueeze.server.engine.sampling import SamplingParams
from kvsqueeze.server.errors import APIError, bad_request
from kvsqueeze.server.schemas import ChatCompletionRequest, CommonRequest, CompletionRequest

MAX_STOP = 4
MAX_PREPARED_METHODS = 64  # distinct (method, params) kept ready; clients choose params freely


@dataclass
class ServeDefaults:
    """What a request gets when it does not choose, and the limits it must keep to."""

    model_name: str
    method: str = "snapkv"
    budget: float | int | str = 0.25
    params: dict[str, Any] = field(default_factory=dict)
    context_method: str = "kvzap"  # compresses cacheable prefixes when the request names no method
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096

    def __post_init__(self) -> None:
        get_method(self.method, **self.params)
        Budget.parse(self.budget)
        get_method(self.context_method)
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"the default max_tokens ({self.default_max_tokens}) must be in [1, {self.max_tokens_limit}]"
            )


class RequestBuilder:
    """Builds engine requests for one model; prepared methods are cached by name and parameters."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        defaults: ServeDefaults,
        tokenizer_lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.lock = tokenizer_lock or threading.Lock()
        self._methods: dict[str, Method] = {}

    # ------------------------------------------------------------------ pieces

    def method(self, name: str, params: dict[str, Any]) -> Method:
        """The method ``name`` with ``params``, ready for the model (a 400 for anything wrong)."""
        key = f"{name}|{sorted(params.items())!r}"
        if key not in self._methods:
            if len(self._methods) >= MAX_PREPARED_METHODS:
                self._methods.clear()
            try:
                self._methods[key] = get_method(name, **params).for_model(self.model)
            except (ValueError, TypeError) as err:
                raise bad_request(str(err), code="invalid_method", param="kvsqueeze.method") from None
        return self._methods[key]

    def _compression(self, body: CommonRequest, cacheable: bool) -> tuple[Method, Budget]:
        opts = body.kvsqueeze
        if opts.method is not None:
            name, params = opts.method, dict(opts.params)
        elif cacheable:
            name, params = self.defaults.context_method, dict(opts.params)
        else:
            name, params = self.defaults.method, {**self.defaults.params, **opts.params}
        method = self.method(name, params)
        if cacheable and method.name not in QUERY_AGNOSTIC:
            raise bad_request(
                f"cache_prefix needs a query-agnostic method ({', '.join(QUERY_AGNOSTIC)}), not {method.name}",
                param="kvsqueeze.method",
            )
        try:
            budget = Budget.parse(opts.budget if opts.budget is not None else self.defaults.budget)
        except ValueError as err:
            raise bad_request(str(err), code="invalid_budget", param="kvsqueeze.budget") from None
        return method, budget

    def _max_tokens(self, *values: int | None) -> int:
        chosen = next((v for v in values if v is not None), self.defaults.default_max_tokens)
        limit = self.defaults.max_tokens_limit
        if not 1 <= chosen <= limit:
            raise bad_request(f"max_tokens must be in [1, {limit}], got {chosen}", param="max_tokens")
        return chosen

    def _sampling(self, body: CommonRequest) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
            )
        except ValueError as err:
            raise bad_request(str(err)) from None

    def _common_checks(self, body: CommonRequest) -> list[str]:
        if body.model != self.defaults.model_name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {self.defaults.model_name!r}",
                code="model_not_found",
                param="model",
            )
        if body.n not in (None, 1):
            raise bad_request(f"n must be 1 (one choice per request), got {body.n}", param="n")
        if body.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP:
            raise bad_request(f"at most {MAX_STOP} stop sequences, got {len(stop)}", param="stop")
        return stop

    def _encode(self, text: str, special: bool) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _finish(
        self,
        ids: list[int],
        prefix: int,
        body: CommonRequest,
        max_tokens: int,
        stop: list[str],
        cacheable: bool,
    ) -> GenerationRequest:
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        try:
            check_prompt_length(self.model, len(ids), max_tokens)
        except ValueError as err:
            raise bad_request(str(err), code="context_length_exceeded") from None
        method, budget = self._compression(body, cacheable)
        return GenerationRequest(
            prompt_ids=ids,
            method=method,
            budget=budget,
            max_tokens=max_tokens,
            sampling=self._sampling(body),
            stop=stop,
            prefix_tokens=prefix,
        )

    # ------------------------------------------------------------------ the two endpoints

    def chat(self, body: ChatCompletionRequest) -> GenerationRequest:
        """A chat request: the messages through the chat template, the leading system ones cacheable."""
        stop = self._common_checks(body)
        if body.tools:
            raise bad_request("tools are not supported", param="tools")
        if not body.messages:
            raise bad_request("messages must not be empty", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions")
        max_tokens = self._max_tokens(body.max_completion_tokens, body.max_tokens)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as err:
            raise bad_request(str(err), param="messages") from None
        opt = body.kvsqueeze.cache_prefix
        if isinstance(opt, str):
            raise bad_request("for chat, cache_prefix is true or false (the leading system messages)")
        with self.lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not opt:
            return self._finish(self._encode(text, False), 0, body, max_tokens, stop, False)
        lead = 0
        while lead < len(messages) and messages[lead]["role"] in ("system", "developer"):
            lead += 1
        if lead == 0:
            raise bad_request("cache_prefix needs leading system messages to cache", param="messages")
        if lead == len(messages):
            raise bad_request("cache_prefix needs a message after the system messages", param="messages")
        with self.lock:
            head = self.tokenizer.apply_chat_template(messages[:lead], tokenize=False)
        if not text.startswith(head) or len(head) == len(text):
            raise bad_request("the chat template does not render the system messages as a prefix")
        prefix = self._encode(head, False)
        ids = prefix + self._encode(text[len(head) :], False)
        return self._finish(ids, len(prefix), body, max_tokens, stop, True)

    def completion(self, body: CompletionRequest) -> GenerationRequest:
        """A text completion request: one prompt string, optionally starting with a cacheable prefix."""
        stop = self._common_checks(body)
        if body.echo:
            raise bad_request("echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise bad_request(f"best_of must be 1, got {body.best_of}", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_request(f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if not prompt or not prompt.strip():
            raise bad_request("the prompt is empty", param="prompt")
        max_tokens = self._max_tokens(body.max_tokens)
        opt = body.kvsqueeze.cache_prefix
        if opt is True:
            raise bad_request("for completions, cache_prefix is the text the prompt starts with")
        if not opt:
            return self._finish(self._encode(prompt, True), 0, body, max_tokens, stop, False)
        if not prompt.startswith(opt) or len(opt) == len(prompt):
            raise bad_request(
                "cache_prefix must be a proper prefix of the prompt", param="kvsqueeze.cache_prefix"
            )
        prefix = self._encode(opt, True)
        ids = prefix + self._encode(prompt[len(opt) :], False)
        return self._finish(ids, len(prefix), body, max_tokens, stop, True)
