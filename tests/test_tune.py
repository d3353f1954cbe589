"""The tuner (EvoPress over per-layer budgets and bits): exact totals or byte budgets never exceeded, a
seeded and resumable search, a KL that falls."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze import SqueezeCache
from kvsqueeze.methods import get_method, with_profile
from kvsqueeze.methods.profiled import LayerProfile
from kvsqueeze.models.tiny import tiny_model, tiny_tokenizer
from kvsqueeze.quantization import kivi_scheme, stored_bytes
from kvsqueeze.tune import (
    BitSpace,
    LevelSpace,
    SearchConfig,
    check_bits_tunable,
    evolve,
    tune_bits,
    tune_profile,
)
from kvsqueeze.tune.bits import bit_space
from kvsqueeze.tune.calibration import (
    calibration_samples,
    continuation_in_one_chunk,
    method_loss,
    profile_loss,
)


@settings(max_examples=200, deadline=None)
@given(
    layers=st.integers(1, 30),
    start=st.integers(1, 8),
    extra=st.integers(0, 8),
    seed=st.integers(0, 10_000),
    rounds=st.integers(1, 20),
)
def test_mutation_keeps_the_total_and_the_bounds(layers, start, extra, seed, rounds):
    space = LevelSpace(num_layers=layers, start=start, max_level=start + extra)
    rng = random.Random(seed)
    levels = space.uniform()
    for _ in range(rounds):
        child = space.mutate(levels, rng)
        space.check(child)  # raises unless the sum and the bounds hold
        assert sum(abs(a - b) for a, b in zip(child, levels, strict=True)) <= 6  # at most 3 switches
        levels = child


def test_mutation_moves_a_level_when_it_can():
    space = LevelSpace(num_layers=4, start=2, max_level=4)
    rng = random.Random(0)
    assert all(space.mutate(space.uniform(), rng) != space.uniform() for _ in range(50))
    # nothing can move: one layer, or every layer at both bounds
    assert LevelSpace(1, 2, 4).mutate((2,), rng) == (2,)
    assert LevelSpace(3, 1, 1).mutate((1, 1, 1), rng) == (1, 1, 1)


def test_bad_spaces_and_candidates_are_one_line_errors():
    with pytest.raises(ValueError, match="start level"):
        LevelSpace(num_layers=4, start=5, max_level=4)
    with pytest.raises(ValueError, match="sum to 8"):
        LevelSpace(num_layers=4, start=2, max_level=4).check((3, 3, 3, 3))
    with pytest.raises(ValueError, match="one entry per stage"):
        SearchConfig(stage_samples=(1, 2), survivors=(4,))


OPTIMUM = (1, 5, 2, 4, 3, 3)  # sums to 18: a candidate of LevelSpace(6, start=3, max_level=6)


def _synthetic_loss(levels, samples):
    """A loss whose minimum is OPTIMUM, the same on every sample."""
    return sum((a - b) ** 2 for a, b in zip(levels, OPTIMUM, strict=True))


def test_search_improves_is_seeded_and_resumes(tmp_path):
    space = LevelSpace(num_layers=6, start=3, max_level=6)  # total 18 = the optimum's sum
    config = SearchConfig(generations=30, offspring=8, stage_samples=(1,), survivors=(3,), seed=7)
    result = evolve(space, _synthetic_loss, 4, config, progress=False)
    assert result.loss < result.start_loss
    assert result.history == sorted(result.history, reverse=True)  # elitism on the whole pool
    assert result.levels == OPTIMUM
    again = evolve(space, _synthetic_loss, 4, config, progress=False)
    assert again.levels == result.levels and again.history == result.history

    state = tmp_path / "search.state.json"
    short = dataclasses.replace(config, generations=12)
    evolve(space, _synthetic_loss, 4, short, state_path=state, progress=False)
    assert json.loads(state.read_text())["generation"] == 12
    # the same search asked for more generations resumes from generation 12 and ends where one run ends
    calls = []
    resumed = evolve(
        space,
        lambda lv, s: calls.append(1) or _synthetic_loss(lv, s),
        4,
        config,
        state_path=state,
        progress=False,
    )
    assert (resumed.levels, resumed.history) == (result.levels, result.history)
    assert json.loads(state.read_text())["generation"] == 30
    fresh = []
    evolve(space, lambda lv, s: fresh.append(1) or _synthetic_loss(lv, s), 4, config, progress=False)
    assert 0 < len(calls) < len(fresh)  # the first 12 generations were not scored again


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", num_hidden_layers=4, seed=1), tiny_tokenizer()


def test_tiny_model_search_lowers_the_kl_of_the_uniform_start(tiny):
    model, tokenizer = tiny
    method = get_method("snapkv", window=4)
    config = SearchConfig(generations=6, offspring=6, stage_samples=(1,), survivors=(2,), seed=0)
    kwargs = dict(documents=3, context_tokens=96, continuation_tokens=8, config=config, progress=False)
    profile, result = tune_profile(model, tokenizer, method, 0.25, **kwargs)
    assert result.loss < result.start_loss
    assert len(profile.keep_ratios) == 4
    assert sum(profile.keep_ratios) / 4 == pytest.approx(0.25)  # the same bytes as the uniform budget
    assert profile.search["kl"] == result.loss and profile.search["uniform_kl"] == result.start_loss
    # the profile's loss, scored again through with_profile, is the one the search reported
    samples = calibration_samples(model, tokenizer, 3, 96, 8, progress=False)
    assert profile_loss(model, samples, method, 0.25, profile.keep_ratios) == pytest.approx(result.loss)
    again, _ = tune_profile(model, tokenizer, method, 0.25, **kwargs)
    assert again.keep_ratios == profile.keep_ratios  # same seed, same profile


def test_untunable_methods_and_budgets_are_refused(tiny):
    model, tokenizer = tiny
    for name in ("full", "kivi"):
        with pytest.raises(ValueError, match="no budget per layer"):
            tune_profile(model, tokenizer, get_method(name), 0.25, progress=False)
    with pytest.raises(ValueError, match=r"ratio in \(0, 1\)"):
        tune_profile(model, tokenizer, get_method("snapkv"), 1.0, progress=False)
    # one step of 0.1 / 4 of 96 tokens is 3 rows, fewer than SnapKV's window of 4 + 1: the level-1 layers
    # would keep more than their share and the profile more than the budget
    with pytest.raises(ValueError, match="fewer rows than snapkv protects"):
        tune_profile(model, tokenizer, get_method("snapkv", window=4), 0.1, context_tokens=96, progress=False)


def test_tune_command_writes_a_profile_every_method_takes(tmp_path, tiny):
    from kvsqueeze.cli.main import main

    model, tokenizer = tiny
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "tuned.json"
    args = ["tune", "--model", str(folder), "--method", "snapkv", "-p", "window=4", "--budget", "0.25"]
    args += ["--documents", "2", "--context-tokens", "96", "--continuation-tokens", "4"]
    args += ["--generations", "2", "--offspring", "3", "--out", str(out)]
    assert main(args) == 0
    profile = LayerProfile.load(out)
    assert profile.search["generations"] == 2 and (tmp_path / "tuned.state.json").exists()
    for name in ("h2o", "pyramidkv", "snapkv"):
        assert with_profile(get_method(name), out).profile.keep_ratios == profile.keep_ratios
    assert main([*args[:-2], "--out", str(out), "--budget", "1.5"]) == 2  # a one-line error, not a trace
    # the same state file with another method's parameters is another search: refused, not resumed
    other = [a if a != "window=4" else "window=5" for a in args]
    assert main([*other[:-2], "--out", str(out), "--generations", "3"]) == 2


# ---------------------------------------------------------------- bit widths under a byte budget (--bytes)

KIVI_SMALL = {"group_size": 8, "residual": 16}  # the tiny models' heads have 16 channels


@st.composite
def _bit_spaces(draw):
    """A BitSpace with random non-decreasing costs per unit and a budget anywhere from 2 bits everywhere
    to above 8 bits everywhere, as kivi's and zipcache's measured costs are."""
    units = draw(st.integers(1, 24))
    costs = []
    for _ in range(units):
        low = draw(st.integers(1, 40))
        mid = low + draw(st.integers(0, 40))
        costs.append((low, mid, mid + draw(st.integers(0, 80))))
    lowest, highest = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    return BitSpace(tuple(costs), draw(st.integers(lowest, highest + 10)))


@settings(max_examples=300, deadline=None)
@given(space=_bit_spaces(), seed=st.integers(0, 10_000), rounds=st.integers(1, 30))
def test_bits_mutation_never_exceeds_the_byte_budget(space, seed, rounds):
    rng = random.Random(seed)
    bits = space.uniform()
    space.check(bits)
    for _ in range(rounds):
        child = space.mutate(bits, rng)
        space.check(child)  # raises if a width is not 2, 4 or 8 or the bytes are over the budget
        assert space.cost(child) <= space.budget
        bits = child


def test_bits_mutation_spends_slack_and_repairs_by_lowering():
    space = BitSpace(((10, 20, 40),) * 4, budget=60)  # 2 bits everywhere: 40 bytes, 20 of slack
    rng = random.Random(0)
    assert space.uniform() == (4, 4, 2, 2)  # the slack goes to the first units
    parent = (2, 2, 4, 2)  # 10 bytes of slack
    children = {space.mutate(parent, rng) for _ in range(50)}
    assert all(space.cost(c) <= 60 for c in children) and any(c.count(4) == 2 for c in children)
    full = BitSpace(((10, 20, 40),) * 4, budget=80)  # at (4, 4, 4, 4) a raise to 8 lowers two others
    children = {full.mutate((4, 4, 4, 4), rng) for _ in range(50)}
    assert all(full.cost(c) <= 80 for c in children) and any(sorted(c) == [2, 2, 4, 8] for c in children)
    tight = BitSpace(((10, 20, 40),) * 2, budget=50)  # from (4, 4), raising one to 8 lowers the other
    assert {tight.mutate((4, 4), rng) for _ in range(20)} == {(8, 2), (2, 8)}
    stuck = BitSpace(((10, 20, 40),) * 2, budget=40)  # (8, 2) would be 50 bytes: nothing can move
    assert stuck.mutate((4, 4), rng) == (4, 4)
    with pytest.raises(ValueError, match="under the 20"):
        BitSpace(((10, 20, 40),) * 2, budget=19)


def test_bit_costs_are_the_caches_measured_bytes_and_bad_budgets_are_refused():
    kivi = get_method("kivi", **KIVI_SMALL)
    space = bit_space(kivi, 4, 16, 0.45, 96)
    # per token and KV head, 16 channels: 2-bit keys 4 B of codes + 8 B of fp16 (min, step) per 8 tokens
    key_bytes = {b: stored_bytes(kivi_scheme(b, 8), 96, 16, names=("keys",)) for b in (2, 4, 8)}
    assert space.costs[0] == tuple(key_bytes.values()) == (12 * 96, 16 * 96, 24 * 96)
    assert space.budget == int(0.45 * 4 * 96 * 64)
    assert space.uniform() == (4, 4, 4, 4, 2, 2, 2, 2)  # 2 bits fit everywhere; the slack goes to keys
    with pytest.raises(ValueError, match=r"under what kivi stores at 2 bits everywhere \(0.3750x fp16\)"):
        bit_space(kivi, 4, 16, 0.3, 96)
    with pytest.raises(ValueError, match="every layer fits at 8 bits"):
        bit_space(kivi, 4, 16, 0.8, 96)
    with pytest.raises(ValueError, match=r"--bytes must be a share .* in \(0, 1\)"):
        check_bits_tunable(kivi, 1.5)
    with pytest.raises(ValueError, match="snapkv does not quantize"):
        check_bits_tunable(get_method("snapkv"), 0.22)


@pytest.mark.parametrize(("name", "params"), [("kivi", KIVI_SMALL), ("zipcache", {"streaming_gap": 10})])
def test_per_layer_bits_change_each_layers_stored_bytes(tiny, name, params):
    model, _ = tiny
    profile = LayerProfile(key_bits=[2, 4, 8, 2], value_bits=[8, 2, 4, 4])
    method = with_profile(get_method(name, **params), profile)
    cache = SqueezeCache(model, method)
    with torch.inference_mode():
        model(torch.randint(3, 500, (1, 96), generator=torch.Generator().manual_seed(0)), cache=cache)
    uniform = get_method(name, bits=4, **params).components().quantize.scheme
    stored = {}
    for i, layer in enumerate(cache.layers):
        scheme = method.components().quantize.scheme_for(i)
        assert (scheme.high_key_bits, scheme.high_value_bits) == (profile.key_bits[i], profile.value_bits[i])
        for part in ("keys", "values"):
            stored[i, part] = layer.rows.nbytes((part,))  # from the cache's tensors, 2 KV heads
            assert stored[i, part] == 2 * stored_bytes(scheme, 96, 16, names=(part,))
    assert stored[0, "keys"] < stored[1, "keys"] < stored[2, "keys"] == max(stored.values())
    assert stored[1, "values"] < stored[2, "values"] < stored[0, "values"]
    # the method's own scheme, unprofiled, stores every layer alike: the profile's bits made the difference
    assert stored[1, "keys"] == 2 * stored_bytes(uniform, 96, 16, names=("keys",))  # 4 bits, both methods


def test_tiny_model_bits_search_lowers_the_kl_and_is_seeded(tiny):
    model, tokenizer = tiny
    method = get_method("kivi", **KIVI_SMALL)
    config = SearchConfig(generations=4, offspring=5, stage_samples=(1,), survivors=(2,), seed=0)
    kwargs = dict(documents=2, context_tokens=96, continuation_tokens=6, config=config, progress=False)
    profile, result = tune_bits(model, tokenizer, method, 0.45, **kwargs)
    assert result.loss < result.start_loss  # the start: keys at 4 bits, values at 2
    assert profile.keep_ratios == [] and len(profile.key_bits) == len(profile.value_bits) == 4
    assert set(profile.key_bits + profile.value_bits) <= {2, 4, 8}
    assert profile.search["start_key_bits"] == [4] * 4 and profile.search["stored_bytes"] <= 0.45
    assert profile.search["kl"] == result.loss and profile.search["start_kl"] == result.start_loss
    samples = calibration_samples(model, tokenizer, 2, 96, 6, progress=False)
    profiled = with_profile(method, profile)  # scored as the tuner does, the continuation in one chunk
    assert method_loss(model, samples, profiled, 1.0, stepwise=False) == pytest.approx(result.loss)
    again, _ = tune_bits(model, tokenizer, method, 0.45, **kwargs)
    assert (again.key_bits, again.value_bits) == (profile.key_bits, profile.value_bits)  # same seed


def test_a_quantizer_continuation_in_one_chunk_is_exact_until_its_residual_fills(tiny):
    """The tuner feeds a pure quantizer's continuation as one chunk while no block of its residual is
    quantized before the continuation's last token: then the loss equals the token-by-token one."""
    model, tokenizer = tiny
    method = get_method("kivi", **KIVI_SMALL)
    block = method.components().quantize.block
    assert continuation_in_one_chunk(method, 96, 6)
    assert continuation_in_one_chunk(method, 4 * block, block)  # the last token attends, then quantizes
    assert not continuation_in_one_chunk(method, 4 * block, block + 1)
    assert not continuation_in_one_chunk(get_method("snapkv+kivi"), 96, 6)  # its kept rows set the residual
    assert not continuation_in_one_chunk(get_method("h2o"), 96, 6)  # evicts while decoding
    assert continuation_in_one_chunk(get_method("snapkv"), 96, 6)  # its cache does not change
    samples = calibration_samples(model, tokenizer, 2, 96, 6, progress=False)
    chunk = method_loss(model, samples, method, 1.0, stepwise=False)
    assert chunk == pytest.approx(method_loss(model, samples, method, 1.0, stepwise=True), rel=1e-4)


def test_bit_profiles_load_old_files_and_refuse_bad_bits(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"keep_ratios": [0.5, 0.25], "model": "m", "method": "prefixkv"}))
    assert LayerProfile.load(old).layer_bits is None  # written before bits existed
    for wrong in ([2, 3], [2, 4.0], [2, True]):
        with pytest.raises(ValueError, match="2, 4 or 8"):
            LayerProfile(key_bits=wrong, value_bits=[2, 2])
    with pytest.raises(ValueError, match="same layers"):
        LayerProfile(key_bits=[2, 4], value_bits=[2])
    with pytest.raises(ValueError, match="keep_ratios or of key_bits"):
        LayerProfile()
    bits = LayerProfile(key_bits=[2, 4], value_bits=[4, 8])
    with pytest.raises(ValueError, match="snapkv does not quantize"):
        with_profile(get_method("snapkv"), bits)
    assert LayerProfile.load(bits.save(tmp_path / "bits.json")) == bits
    # bits change how rows are stored, not how many: a profiled quantizer still keeps every row
    assert not with_profile(get_method("kivi"), bits).uses_budget
    assert with_profile(get_method("snapkv+kivi"), bits).uses_budget


def test_tune_bytes_command_writes_a_profile_generate_and_the_bench_take(tmp_path, tiny, capsys):
    from kvsqueeze.bench.runner import MethodSpec
    from kvsqueeze.cli.main import main

    model, tokenizer = tiny
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "bits.json"
    kivi = ["--method", "kivi", "-p", "group_size=8", "-p", "residual=16"]
    args = ["tune", "--model", str(folder), *kivi, "--bytes", "0.45", "--documents", "2"]
    args += ["--context-tokens", "64", "--continuation-tokens", "4", "--generations", "2", "--offspring", "3"]
    assert main([*args, "--out", str(out)]) == 0
    profile = LayerProfile.load(out)
    assert profile.search["target"] == "bits" and len(profile.key_bits) == 4
    assert "key bits per layer" in capsys.readouterr().out
    spec = MethodSpec("kivi", KIVI_SMALL, profile=str(out))
    assert spec.build().components().quantize.layer_bits == profile.layer_bits
    generate = ["generate", "hello", "--model", str(folder), *kivi, "--profile", str(out), "-n", "2"]
    assert main([*generate, "--no-chat"]) == 0
    # one-line errors, exit status 2: out of range (before and after the model loads), no bits to search
    capsys.readouterr()
    assert main([*args, "--bytes", "1.5"]) == 2
    assert main([*args, "--bytes", "0.3"]) == 2  # under 2 bits everywhere (0.375x on this model)
    assert main(["tune", "--model", str(folder), "--method", "snapkv", "--bytes", "0.3"]) == 2
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("kvsqueeze: error:")]  # not the loading bars
    assert len(errors) == 3 and "in (0, 1)" in errors[0] and "does not quantize" in errors[2]
    assert "2 bits everywhere" in errors[1]


def test_server_admission_prior_reads_a_bit_profile():
    """Before any measured prefill the server guesses a request's bytes from the bits each layer stores."""
    from kvsqueeze.cache.budget import Budget
    from kvsqueeze.server.engine.admission import prior_ratio

    kivi = get_method("kivi", **KIVI_SMALL)  # 2 bits
    wide = with_profile(kivi, LayerProfile(key_bits=[8, 8, 8, 8], value_bits=[8, 8, 8, 4]))
    budget = Budget.parse(1.0)
    assert prior_ratio(kivi, budget, 1000, torch.float32) == pytest.approx(2 * 2 / 32)
    assert prior_ratio(wide, budget, 1000, torch.float32) == pytest.approx(2 * 7.5 / 32)
