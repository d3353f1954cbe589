"""Offline layer budgets: a profile measured once (PrefixKV's search) and reused by any method."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import left_padded_batch

from kvsqueeze import SqueezeCache
from kvsqueeze.cli.main import main
from kvsqueeze.methods import LayerProfile, compute_profile, get_method, with_profile
from kvsqueeze.models.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", num_hidden_layers=6, seed=0)


def test_profile_averages_the_online_ratios(model, tmp_path):
    prompts = [left_padded_batch([n], seed=20 + n)[0] for n in (200, 260)]
    profile = compute_profile(model, prompts, get_method("prefixkv"), 0.3, progress=False)
    assert len(profile.keep_ratios) == 6 and profile.num_prompts == 2
    assert sum(profile.keep_ratios) / 6 == pytest.approx(0.3, abs=0.03)
    online = []
    for ids in prompts:
        cache = SqueezeCache(model, "prefixkv", 0.3)
        with torch.inference_mode():
            model(ids, cache=cache)
        online.append(cache.stored_rows()[:, 0, 0].float() / ids.shape[1])
    assert profile.keep_ratios == pytest.approx(torch.stack(online).mean(0).tolist(), abs=1e-5)
    path = profile.save(tmp_path / "p.json")
    assert LayerProfile.load(path) == profile


def test_any_method_takes_the_profiled_layer_budgets(model):
    profile = LayerProfile(keep_ratios=[0.6, 0.2, 0.2, 0.4, 0.3, 0.1])
    ids, _ = left_padded_batch([300], seed=21)
    cache = SqueezeCache(model, with_profile(get_method("snapkv", window=8), profile), 0.25)
    with torch.inference_mode():
        model(ids, cache=cache)
    rows = cache.stored_rows()[:, 0, 0].tolist()
    # the shape of the profile, scaled to a mean of 0.25
    assert rows == [300 - round((1 - r * 0.25 / 0.3) * 300) for r in profile.keep_ratios]
    assert cache.method.name == "snapkv+profile"


def test_profiled_prefixkv_runs_without_a_search_and_still_decodes_as_a_fifo(model):
    profile = LayerProfile(keep_ratios=[0.5, 0.4, 0.3, 0.2, 0.2, 0.2])
    ids, _ = left_padded_batch([200], seed=22)
    cache = SqueezeCache(model, with_profile(get_method("prefixkv"), profile), 0.3)
    with torch.inference_mode():
        model(ids, cache=cache)
        kept = cache.stored_rows()[:, 0, 0].clone()
        token = ids[:, -1:]
        for _ in range(20):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    assert cache.group.statistics == [None] * 6  # no online search ran
    assert cache.stored_rows()[:, 0, 0].tolist() == (kept * 220 // 200).tolist()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("not json", "not JSON"),
        (json.dumps({"x": 1}), "no keep_ratios"),
        (json.dumps({"keep_ratios": [0]}), "(0, 1]"),
    ],
)
def test_bad_profile_files(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        with_profile(get_method("snapkv"), path)


def test_profile_with_the_wrong_number_of_layers(model):
    cache = SqueezeCache(model, with_profile(get_method("snapkv", window=8), LayerProfile([0.5, 0.5])), 0.25)
    with pytest.raises(ValueError, match="the profile has 2 layers, the model 6"), torch.inference_mode():
        model(left_padded_batch([100], seed=23)[0], cache=cache)


def test_profile_command_writes_a_profile_generate_can_use(smollm2, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--budget", "0.4", "--length", "300", "--samples", "1", "--out", str(out)]) == 0
    assert len(LayerProfile.load(out).keep_ratios) == 30
    capsys.readouterr()
    args = [
        "generate",
        "Name a color.",
        "--method",
        "streaming_llm",
        "--budget",
        "0.5",
        "--profile",
        str(out),
    ]
    assert main([*args, "-n", "4"]) == 0
    assert "streaming_llm+profile" in capsys.readouterr().err
