"""Bad input gives one clear line: from the API as ValueError, from the CLI as exit 2 with no traceback."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch
from transformers import GPT2Config, GPT2LMHeadModel

from kvsqueeze import Budget, SqueezeCache, get_method
from kvsqueeze.cli.main import main


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text
    return text


def test_unknown_method():
    with pytest.raises(ValueError) as err:
        get_method("snapkvv")
    assert "snapkv" in one_line(err)


def test_unknown_parameter():
    with pytest.raises(ValueError) as err:
        get_method("snapkv", windw=3)
    assert "window" in one_line(err)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, 0, -3, "abc", float("nan")])
def test_bad_budget(bad):
    with pytest.raises(ValueError) as err:
        Budget.parse(bad)
    one_line(err)


def test_budget_smaller_than_sinks_plus_window(tiny_models):
    model = tiny_models("llama")
    ids, _ = left_padded_batch([100], seed=1)
    cache = SqueezeCache(model, "snapkv", budget=20)  # window 32
    with pytest.raises(ValueError) as err, torch.inference_mode():
        model(ids, cache=cache)
    assert "at least 33" in one_line(err)


def test_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError) as err:
        SqueezeCache(model, "snapkv", budget=0.5)
    assert "gpt2" in one_line(err)


def test_empty_prompt(smollm2):
    from kvsqueeze.generation import generate

    model, tokenizer = smollm2
    with pytest.raises(ValueError) as err:
        generate(model, tokenizer, "   ")
    assert "empty" in one_line(err)


def test_prompt_longer_than_the_model(smollm2):
    from kvsqueeze.generation import generate

    model, tokenizer = smollm2
    with pytest.raises(ValueError) as err:
        generate(model, tokenizer, "word " * 9000, max_new_tokens=4)
    assert "exceeds" in one_line(err)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "hi", "--method", "nope"], "unknown method"),
        (["generate", "hi", "--budget", "0"], "budget"),
        (["generate", "hi", "--budget", "1.5"], "budget"),
        (["generate", "", "--method", "snapkv"], "empty"),
        (["generate", "--file", "/no/such/file.txt"], "not found"),
        (["generate", "hi", "--model", "no such model"], "model"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvsqueeze: error:") and needle in lines[0].lower()


def test_cli_long_prompt_and_small_budget(smollm2, capsys, tmp_path):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("word " * 9000)
    assert main(["generate", "--file", str(long_prompt), "-n", "2"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert main(["generate", "Tell me a story about a cat.", "--budget", "8", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "at least" in err
