"""Query-agnostic compression: native KVzip (scored by a replay) and the learned KVzap scorer."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, squeeze_generate, stock_generate

from kvsqueeze import SqueezeCache
from kvsqueeze.allocators.global_topk import global_counts
from kvsqueeze.cache.replay import ReplayText
from kvsqueeze.methods import KVzap, get_method
from kvsqueeze.models.tiny import tiny_model, tiny_tokenizer
from kvsqueeze.scorers.learned import ScorerWeights

NEW = 8


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(chat=True)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_hidden_layers=3, seed=0)


def random_weights(model, seed: int = 0) -> ScorerWeights:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    n, h, d = config.num_hidden_layers, config.num_key_value_heads, config.hidden_size
    return ScorerWeights({"weight": torch.randn(n, h, d, generator=g), "bias": torch.zeros(n, h)})


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(
        [ReplayText.for_tokenizer(tokenizer).header + tokenizer.encode(text, add_special_tokens=False)]
    )


# ------------------------------------------------------------------ kvzip against a from-scratch reference


def reference_scores(
    tokenizer,
    ids: torch.Tensor,
    chunk_size: int,
    sinks: int = 4,
    overlap: int = 8,
    keep_header: bool = False,
    plus: bool = False,
):
    """KVzip's scores from an eager model's full attention maps (B = 1), per layer (H_kv, L).

    Each round is one eager forward over prompt + replay; restricting the softmax to sinks, the chunk and
    the replay is a renormalization of the full probabilities over those columns. No round repeats the
    template's header: it scores 0, or +inf (always kept) with ``keep_header``. ``plus`` (KVzip+) multiplies
    each probability by ``||W_O^(head) v||``, computed head by head, and divides it by the norm of the query
    token's attention input, captured by a hook.
    """
    eager = tiny_model("llama", num_hidden_layers=3, seed=0, attn_implementation="eager")
    inputs: dict[int, torch.Tensor] = {}
    for index, block in enumerate(eager.model.layers):
        block.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=index: inputs.__setitem__(i, kw["hidden_states"][0]), with_kwargs=True
        )
    d = eager.config.head_dim
    text = ReplayText.for_tokenizer(tokenizer)
    prompt = ids[0].tolist()
    header = len(text.header)
    context = prompt[header:]
    chunks = [context[i : i + chunk_size] for i in range(0, len(context), chunk_size)]
    length, g = len(prompt), eager.config.num_attention_heads // eager.config.num_key_value_heads
    best = torch.zeros(eager.config.num_hidden_layers, eager.config.num_key_value_heads, length)
    for r, chunk in enumerate(chunks):
        lead = text.repeat if r == 0 else text.resume + chunks[r - 1][-overlap:]
        replay = lead + text.turn + chunk
        with torch.no_grad():
            out = eager(torch.tensor([prompt + replay]), output_attentions=True, use_cache=True)
        start = header + r * chunk_size
        allowed = torch.zeros(length + len(replay), dtype=torch.bool)
        allowed[:sinks] = True
        allowed[start : start + len(chunk)] = True
        allowed[length:] = True
        for layer, attn in enumerate(out.attentions):  # (1, H, T, T)
            rows = attn[0, :, length:].float() * allowed  # replay queries
            rows = rows / rows.sum(-1, keepdim=True)
            if plus:
                values = out.past_key_values.layers[layer].values[0].float()  # (H_kv, T, D)
                w_o = eager.model.layers[layer].self_attn.o_proj.weight.float()  # (D_model, H*D)
                written = torch.stack(
                    [
                        (values[h // g] @ w_o[:, h * d : (h + 1) * d].T).norm(dim=-1)
                        for h in range(rows.shape[0])
                    ]
                )  # (H, T)
                rows = rows / inputs[layer][length:].float().norm(dim=-1)[None, :, None] * written[:, None]
            per_kv = rows.view(-1, g, *rows.shape[1:]).amax(dim=(1, 2))  # (H_kv, T)
            span = slice(start, start + len(chunk))
            best[layer, :, span] = torch.maximum(best[layer, :, span], per_kv[:, span])
    if keep_header:
        best[:, :, :header] = float("inf")
    return best


@pytest.mark.parametrize(
    ("chunk_size", "keep_header", "plus"),
    [(1000, False, False), (48, False, False), (48, True, False), (48, False, True)],
)
def test_kvzip_scores_match_reference(llama, tokenizer, chunk_size, keep_header, plus):
    ids = prompt_ids(tokenizer, "The code for the north gate is 7302. " * 4)
    source = SqueezeCache(llama, "full", record_prefill=True, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=source)
    scores = source.replay_scores("kvzip", chunk_size=chunk_size, keep_header=keep_header, plus=plus)
    got = torch.stack([s[0] for s in scores])  # (N, H_kv, L)
    expected = reference_scores(tokenizer, ids, chunk_size, keep_header=keep_header, plus=plus)
    assert got.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.allclose(got[finite], expected[finite], atol=1e-5, rtol=1e-4)
    header = len(ReplayText.for_tokenizer(tokenizer).header)
    assert bool((got[..., header:] > 0).all())  # every context row is scored by some round


def test_kvzip_keeps_the_header_only_when_told(llama, tokenizer):
    """By default the template's header scores 0 (no replay repeats it), as KVzip's code; keep_header=True
    keeps it whole."""
    ids = prompt_ids(tokenizer, "The code for the north gate is 7302. " * 4)
    source = SqueezeCache(llama, "full", record_prefill=True, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=source)
    kept = torch.stack([s[0] for s in source.replay_scores("kvzip", chunk_size=1000, keep_header=True)])
    free = torch.stack([s[0] for s in source.replay_scores("kvzip", chunk_size=1000)])
    header = len(ReplayText.for_tokenizer(tokenizer).header)
    assert (
        header > 4 and bool(torch.isinf(kept[..., :header]).all()) and bool((free[..., :header] == 0).all())
    )
    assert torch.equal(kept[..., header:], free[..., header:])
    compressed = source.fork("kvzip", 0.5)
    assert compressed.nbytes() < source.nbytes()


def test_replay_leaves_the_source_untouched(llama, tokenizer):
    ids = prompt_ids(tokenizer, "alpha beta gamma delta " * 5)
    source = SqueezeCache(llama, "full", record_prefill=True, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=source)
    before = [layer.keys.clone() for layer in source.layers]
    source.replay_scores("kvzip", chunk_size=32)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, source.layers, strict=True))
    assert source.get_seq_length() == ids.shape[1]


# ------------------------------------------------------------------ lossless and batched


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["kvzip", "kvzap"])
def test_lossless_at_keep_one(arch, method, tokenizer):
    model = tiny_model(arch, num_hidden_layers=3, seed=0)
    ids, mask = left_padded_batch([40, 23, 31], seed=2)
    expected = stock_generate(model, ids, mask, max_new_tokens=NEW)
    built = get_method("kvzip") if method == "kvzip" else KVzap(fitted=random_weights(model))
    cache = SqueezeCache(model, built, budget=1.0, tokenizer=tokenizer)
    got = squeeze_generate(model, cache, ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["kvzip", "kvzip_plus", "kvzap"])
def test_batched_equals_one_by_one(llama, tokenizer, method):
    texts = ["the lamp is red and the door is blue " * 3, "seven ducks swim " * 2, "a b c d e f g " * 4]
    built = (
        KVzap(window=2, fitted=random_weights(llama))
        if method == "kvzap"
        else get_method("kvzip", chunk_size=40, plus=method == "kvzip_plus")
    )
    header = ReplayText.for_tokenizer(tokenizer).header
    singles = [torch.tensor([header + tokenizer.encode(t, add_special_tokens=False)]) for t in texts]
    width = max(s.shape[1] for s in singles)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(singles):
        ids[i, width - s.shape[1] :] = s[0]
        mask[i, width - s.shape[1] :] = 1
    batch = SqueezeCache(llama, built, 0.3, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=batch)
    for i, single_ids in enumerate(singles):
        one = SqueezeCache(llama, built, 0.3, tokenizer=tokenizer)
        with torch.inference_mode():
            llama(single_ids, cache=one)
        for layer_b, layer_1 in zip(batch.layers, one.layers, strict=True):
            assert layer_b.kept_positions()[i] == layer_1.kept_positions()[0]


@pytest.mark.parametrize("method", ["kvzip", "kvzap"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_stored_bytes_follow_the_ratio(llama, tokenizer, method, ratio):
    built = get_method("kvzip") if method == "kvzip" else KVzap(fitted=random_weights(llama))
    ids = prompt_ids(tokenizer, "Numbers: 1841, 2203, 9977 and 5150 are filed here. " * 6)
    cache = SqueezeCache(llama, built, ratio, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=cache)
    assert cache.kv_nbytes() <= (ratio + 0.05) * cache.full_nbytes()
    kept = cache.stored_rows().sum()
    layers, heads = len(cache.layers), llama.config.num_key_value_heads
    assert int(kept) == layers * heads * int(torch.ceil(torch.tensor(ids.shape[1] * ratio)))


# floors the plain top-k falls short of on this prompt; floor x budget + the protected rows fit the budget
@pytest.mark.parametrize("method, floor", [("kvzip", 0.9), ("kvzap", 0.75)])
def test_floor_gives_every_head_its_share_of_the_budget(llama, tokenizer, method, floor):
    ids = prompt_ids(tokenizer, "Numbers: 1841, 2203, 9977 and 5150 are filed here. " * 6)
    share = int(floor * int(torch.ceil(torch.tensor(ids.shape[1] * 0.25))))
    weights, kept = random_weights(llama), {}
    for f in (0.0, floor):
        built = get_method("kvzip", floor=f) if method == "kvzip" else KVzap(fitted=weights, floor=f)
        cache = SqueezeCache(llama, built, 0.25, tokenizer=tokenizer)
        with torch.inference_mode():
            llama(ids, cache=cache)
        kept[f] = cache.stored_rows()  # (N_layers, B, H_kv)
    assert int(kept[floor].sum()) == int(kept[0.0].sum())  # the same total, shared otherwise
    assert int(kept[0.0].min()) < share <= int(kept[floor].min())


@pytest.mark.parametrize("method", ["kvzip", "kvzap"])
def test_floor_outside_zero_to_one_is_refused(method):
    with pytest.raises(ValueError, match=f"{method}: floor must be in"):
        get_method(method, floor=1.5)


def test_kvzip_composes_with_quantization_and_profiles(llama, tokenizer, tmp_path):
    from kvsqueeze.methods import LayerProfile, with_profile

    ids = prompt_ids(tokenizer, "one two three four five six " * 6)
    quantized = SqueezeCache(llama, "kvzip+kivi", 0.5, tokenizer=tokenizer, group_size=16, residual=16)
    with torch.inference_mode():
        llama(ids, cache=quantized)
    plain = SqueezeCache(llama, "kvzip", 0.5, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=plain)
    assert torch.equal(quantized.stored_rows(), plain.stored_rows())  # same rows, fewer bytes
    assert quantized.kv_nbytes() < plain.kv_nbytes()
    profile = LayerProfile(keep_ratios=[0.9, 0.5, 0.1])
    profiled = SqueezeCache(llama, with_profile(get_method("kvzip"), profile), 0.5, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=profiled)
    rows = profiled.stored_rows()[:, 0, 0]
    assert rows[0] > rows[1] > rows[2]


def test_kvzip_needs_the_tokenizer_and_full_attention(llama, tokenizer):
    with pytest.raises(ValueError, match="tokenizer="):
        SqueezeCache(llama, "kvzip", 0.5)
    with pytest.raises(ValueError, match="sliding-window"):
        SqueezeCache(tiny_model("gemma3_text", num_hidden_layers=2), "kvzip", 0.5, tokenizer=tokenizer)


def test_global_counts_keep_the_total_and_the_protected_rows():
    g = torch.Generator().manual_seed(0)
    ranked = [torch.rand(2, 3, 20, generator=g) for _ in range(4)]
    ranked[1][:, :, 15:] = float("-inf")  # a shorter layer
    ranked[2][:, 0, :2] = float("inf")  # protected rows
    counts = global_counts(ranked, torch.tensor([5, 10]))
    totals = sum(c.sum(-1) for c in counts)
    assert totals.tolist() == [4 * 3 * 5, 3 * 3 * 10 + 3 * 10]
    assert bool((counts[2][:, 0] >= 2).all())


@pytest.mark.parametrize("floor", [0.25, 0.5, 1.0])
def test_global_counts_give_every_head_its_floor(floor):
    g = torch.Generator().manual_seed(1)
    ranked = [torch.rand(2, 3, 40, generator=g) * 10**layer for layer in range(4)]  # one layer dominates
    budget = torch.tensor([8, 20])
    plain, floored = global_counts(ranked, budget), global_counts(ranked, budget, floor)
    assert int(plain[0].min()) < floor * 8  # without a floor the smallest scores lose whole heads
    assert torch.equal(sum(c.sum(-1) for c in floored), sum(c.sum(-1) for c in plain))
    for counts in floored:
        assert bool((counts >= (floor * budget).long()[:, None]).all())
    if floor == 1.0:  # a uniform split
        assert all(torch.equal(c, budget[:, None].expand(2, 3)) for c in floored)


# ------------------------------------------------------------------ the learned scorer


def test_kvzap_without_weights_names_the_calibrate_command(llama):
    with pytest.raises(ValueError, match="kvsqueeze calibrate --model MODEL --method kvzap"):
        SqueezeCache(llama, "kvzap", 0.5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_scorer_file_round_trips(tmp_path, kind):
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        tensors = {"weight": torch.randn(3, 2, 8, generator=g), "bias": torch.randn(3, 2, generator=g)}
    else:
        tensors = {
            "w1": torch.randn(3, 5, 8, generator=g),
            "b1": torch.randn(3, 5, generator=g),
            "w2": torch.randn(3, 2, 5, generator=g),
            "b2": torch.randn(3, 2, generator=g),
        }
    weights = ScorerWeights(tensors, {"fingerprint": "abc", "model": "tiny"})
    loaded = ScorerWeights.load(weights.save(tmp_path / "w.safetensors"))
    assert loaded.kind == kind and loaded.metadata == weights.metadata
    assert all(torch.equal(loaded.tensors[k], v) for k, v in weights.tensors.items())
    x = torch.randn(4, 8, generator=g)
    assert torch.equal(loaded.predict(1, x), weights.predict(1, x))
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a scorer weights file"):
        ScorerWeights.load(tmp_path / "other.safetensors")


def calibration_folder(tmp_path, monkeypatch, tokenizer):
    """A tiny llama saved as an HF folder, with the user cache (where calibrate writes) under ``tmp_path``."""
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", num_hidden_layers=2, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_calibration_documents_join_short_texts_once_the_long_ones_run_out(monkeypatch, tokenizer):
    """Each kind gives its long texts first, then its short ones joined; every document has the length asked."""
    from kvsqueeze.calibrate import documents

    kinds = {
        "_pydocs_texts": ["alpha " * 30, "beta " * 5, "gamma " * 5, "delta " * 5],
        "_source_texts": ["def f(): pass\n" * 12],
        "_reference_texts": ["prose words here " * 10],
    }
    for name, texts in kinds.items():
        monkeypatch.setattr(documents, name, lambda texts=texts: iter(texts))
    docs = documents.calibration_documents(tokenizer, 4, 12)
    assert all(len(d) == 12 for d in docs)
    decoded = [tokenizer.decode(d) for d in docs]
    assert "alpha" in decoded[0] and "def" in decoded[1] and "prose" in decoded[2]
    assert "beta" in decoded[3]  # pydocs' long text is used up: its short ones are joined
    with pytest.raises(ValueError, match="ran out after"):
        documents.calibration_documents(tokenizer, 40, 12)


def test_calibrate_end_to_end_and_resume(tmp_path, monkeypatch, tokenizer):
    """The CLI fits weights for an HF folder; `--method kvzap` then finds them; an interrupted run resumes."""
    from kvsqueeze.calibrate import fit
    from kvsqueeze.cli.main import main
    from kvsqueeze.models import load_model

    folder = calibration_folder(tmp_path, monkeypatch, tokenizer)
    args = ["calibrate", "--model", str(folder), "--documents", "3", "--held-out", "1", "--tokens", "48"]

    scored = []
    real = fit.document_scores

    def counted(*a, interrupt_at: int | None = None, **k):
        scored.append(1)
        if len(scored) == interrupt_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fit, "document_scores", lambda *a, **k: counted(*a, interrupt_at=2, **k))
    assert main(args) == 130  # interrupted while scoring the second document
    scored.clear()
    monkeypatch.setattr(fit, "document_scores", counted)
    assert main(args) == 0
    assert len(scored) == 2  # the first document was not scored again
    model, tok = load_model(str(folder))
    cache = SqueezeCache(model, "kvzap", 0.5, window=2)
    ids = prompt_ids(tok, "some text to compress " * 4)
    with torch.inference_mode():
        model(ids, cache=cache)
    assert cache.kv_nbytes() <= 0.55 * cache.full_nbytes()
    weights = cache.method.fitted
    assert weights.metadata["documents"] == "3" and int(weights.metadata["tokens"]) > 0


def test_calibrate_to_kvzip_plus_keeps_its_own_weights(tmp_path, monkeypatch, tokenizer):
    """`--teacher kvzip+` fits KVzip+ scores; `kvzap:plus=true` finds them, and plain kvzap does not."""
    from kvsqueeze.cli.main import main
    from kvsqueeze.models import load_model

    folder = calibration_folder(tmp_path, monkeypatch, tokenizer)
    args = ["calibrate", "--model", str(folder), "--documents", "2", "--held-out", "1", "--tokens", "40"]
    assert main([*args, "--teacher", "kvzip+"]) == 0
    model, _ = load_model(str(folder))
    cache = SqueezeCache(model, "kvzap", 0.5, plus=True)
    assert cache.method.fitted.metadata["target"] == "log kvzip+ score"
    with pytest.raises(ValueError, match="--method kvzap`"):
        SqueezeCache(model, "kvzap", 0.5)


def test_calibrate_an_mlp_student_and_refit_it_linear_from_the_same_state(tmp_path, monkeypatch, tokenizer):
    """`--student mlp` keeps row samples and fits the MLP `kvzap:mlp=true` finds; a linear fit then reuses the
    scored documents of its state."""
    from kvsqueeze.calibrate import fit
    from kvsqueeze.cli.main import main
    from kvsqueeze.models import load_model
    from kvsqueeze.models.fingerprint import model_fingerprint
    from kvsqueeze.weights import user_weights_path

    folder = calibration_folder(tmp_path, monkeypatch, tokenizer)
    model, tok = load_model(str(folder))
    with pytest.raises(ValueError, match="--method kvzap --student mlp`"):
        SqueezeCache(model, "kvzap", 0.5, mlp=True)
    args = ["calibrate", "--model", str(folder), "--documents", "3", "--held-out", "1", "--tokens", "40"]
    assert main([*args, "--student", "mlp", "--mlp-hidden", "8", "--mlp-rows", "16"]) == 0
    cache = SqueezeCache(model, "kvzap", 0.5, window=2, mlp=True)
    mlp = cache.method.fitted
    assert mlp.kind == "mlp" and mlp.tensors["w1"].shape[1] == 8 and mlp.metadata["mlp_rows"] == str(2 * 16)
    assert float(mlp.metadata["held_out_r2"]) > -1.0  # a real fit, not noise around the mean
    with torch.inference_mode():
        model(prompt_ids(tok, "some text to compress " * 4), cache=cache)
    assert cache.kv_nbytes() <= 0.55 * cache.full_nbytes()

    scored = []
    monkeypatch.setattr(fit, "document_scores", lambda *a, **k: scored.append(1) or None)
    fingerprint = model_fingerprint(model)
    linear = user_weights_path("kvzap", fingerprint)
    linear.parent.mkdir(parents=True)
    user_weights_path("kvzap_mlp", fingerprint).with_suffix(".state.pt").rename(
        linear.with_suffix(".state.pt")
    )
    assert main(args) == 0 and not scored  # nothing scored again
    assert SqueezeCache(model, "kvzap", 0.5).method.fitted.kind == "linear"


def test_kvzap_plus_without_weights_names_the_teacher(llama):
    with pytest.raises(ValueError, match="--method kvzap --teacher kvzip\\+"):
        SqueezeCache(llama, "kvzap", 0.5, plus=True)


@pytest.mark.parametrize("plus", [False, True])
def test_shipped_weights_serve_the_packaged_model(smollm2, plus):
    """A fresh machine runs kvzap (and kvzap:plus=true) on the packaged SmolLM2 with no calibration step."""
    import kvsqueeze
    from kvsqueeze.methods.kvzap import weights_name
    from kvsqueeze.models.fingerprint import model_fingerprint
    from kvsqueeze.weights import shipped_weights

    model, tokenizer = smollm2
    shipped = {ScorerWeights.load(p).fingerprint for p in shipped_weights(weights_name(plus))}
    assert model_fingerprint(model) in shipped
    prompt = "The locker code is 4471. The weather was mild and the meeting ran long. " * 8
    result = kvsqueeze.generate(model, tokenizer, prompt, "kvzap", 0.5, max_new_tokens=4, plus=plus)
    assert result.cache_bytes < 0.6 * result.full_cache_bytes


def test_weights_ship_for_every_full_attention_packaged_model():
    """kvzap needs no calibration step on any packaged model kvzip can score (Gemma 3's sliding layers it cannot)."""
    from kvsqueeze.models.registry import PACKAGED_MODELS
    from kvsqueeze.weights import shipped_weights

    shipped = {
        ScorerWeights.load(p).metadata["model"]: ScorerWeights.load(p) for p in shipped_weights("kvzap")
    }
    full_attention = {alias for alias, m in PACKAGED_MODELS.items() if m.architecture != "gemma3_text"}
    assert set(shipped) == full_attention
    layers = {"smollm2-135m": 30, "qwen2.5-coder-0.5b": 24, "qwen2.5-coder-1.5b": 28}
    assert {alias: w.num_layers for alias, w in shipped.items()} == layers


def test_kvzip_plus_weights_ship_for_the_measured_models():
    """kvzap(plus=True)'s weights (fitted to KVzip+) ship for the two models the query-agnostic blocks measure."""
    from kvsqueeze.weights import shipped_weights

    loaded = [ScorerWeights.load(p) for p in shipped_weights("kvzap_plus")]
    shipped = {w.metadata["model"]: w for w in loaded}
    assert {alias: w.num_layers for alias, w in shipped.items()} == {
        "smollm2-135m": 30,
        "qwen2.5-coder-0.5b": 24,
    }
    assert {w.metadata["target"] for w in shipped.values()} == {"log kvzip+ score"}
    plain = {ScorerWeights.load(p).metadata["target"] for p in shipped_weights("kvzap")}
    assert plain == {"log kvzip score"}


def test_kvzip_window_keeps_the_prompts_last_rows(llama, tokenizer):
    """window=N keeps the last N prompt rows in every head (a question asked inside the prompt), none by default."""
    ids = prompt_ids(tokenizer, "The code for the north gate is 7302. The weather was mild. " * 6)
    n = ids.shape[1]
    source = SqueezeCache(llama, "full", record_prefill=True, tokenizer=tokenizer)
    with torch.inference_mode():
        llama(ids, cache=source)
    tail = set(range(n - 8, n))
    windowed = source.fork("kvzip", 0.1, window=8)
    for layer in windowed.layers:
        for head in layer.kept_positions()[0]:
            assert tail <= set(head)
    plain = source.fork("kvzip", 0.1)
    assert any(not tail <= set(head) for layer in plain.layers for head in layer.kept_positions()[0])
    with pytest.raises(ValueError, match="window must be >= 0"):
        source.fork("kvzip", 0.1, window=-1)
