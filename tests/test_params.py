"""Typed ``-p NAME=VALUE`` parsing (issue 24, item 2): every field of every registered method, and the CLI."""

from __future__ import annotations

import dataclasses
import enum
import subprocess
import sys
import types
import typing

import pytest

from kvsqueeze.cli import commands
from kvsqueeze.cli.main import main
from kvsqueeze.cli.params import coerce_params, describe_type, field_types
from kvsqueeze.methods import METHODS, get_method

FIELDS = [  # every hyperparameter of every registered method (not internal state such as loaded weights)
    pytest.param(name, param, id=f"{name}.{param}")
    for name in sorted(METHODS)
    for param in field_types(METHODS[name])
]


def _members(hint: object) -> tuple[list[object], bool]:
    """The non-None members of a union (or the hint itself), and whether None is allowed."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


def _sample(hint: object) -> tuple[str, object]:
    """A valid command-line text for ``hint`` and the value it must convert to."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "Yes", True
    if hint is int:
        return "7", 7
    if hint is float:
        return "1", 1.0
    if hint is str:
        return "'avg'", "avg"
    if origin is typing.Literal:
        return str(args[0]), args[0]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        member = next(iter(hint))
        return str(member.value), member
    if hint is tuple or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        element = args[0] if args else int
        text, value = _sample(element)
        return f"({text},{text})", (value, value)
    if origin is tuple:
        pairs = [_sample(a) for a in args]
        return ",".join(t for t, _ in pairs), tuple(v for _, v in pairs)
    pytest.fail(f"no sample text for {hint!r}: teach kvsqueeze/cli/params.py and this test the type")


def _wrong(hint: object) -> str | None:
    """A text that is not a ``hint`` (None for str: every text is one)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "maybe"
    if hint is int:
        return "1.5"
    if hint is float:
        return "abc"
    if hint is str:
        return None
    if origin is typing.Literal or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return "no-such-choice"
    if hint is tuple:
        return None  # untyped elements: any text is a tuple of texts
    if origin is tuple:
        element = _wrong(args[0])
        return None if element is None else f"{_sample(args[0])[0]},{element}"
    pytest.fail(f"no wrong text for {hint!r}")


_WORDS = {bool: "a bool", int: "an int", float: "a float", str: "a string"}


def _text_of(value: object) -> str:
    """A field's default written as it is typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        return "(" + ",".join(_text_of(v) for v in value) + (",)" if len(value) == 1 else ")")
    return str(value)


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_there_are_fields_to_check():
    assert len(FIELDS) > 20
    assert all(hint is not None for name in METHODS for hint in field_types(METHODS[name]).values())


@pytest.mark.parametrize(("method", "param"), FIELDS)
def test_a_valid_text_converts_to_the_fields_type(method, param):
    hint = field_types(METHODS[method])[param]
    members, optional = _members(hint)
    for member in members:
        text, expected = _sample(member)
        value = coerce_params(method, {param: text})[param]
        assert value == expected and type(value) is type(expected), (text, value)
    if optional:
        assert coerce_params(method, {param: "None"})[param] is None


@pytest.mark.parametrize(("method", "param"), FIELDS)
def test_the_default_written_as_text_reads_back_and_builds(method, param):
    f = next(f for f in dataclasses.fields(METHODS[method]) if f.name == param)
    default = _default(f)
    if default is dataclasses.MISSING:
        pytest.skip("no default")
    params = coerce_params(method, {param: _text_of(default)})
    assert params[param] == default
    assert getattr(get_method(method, **params), param) == default


@pytest.mark.parametrize(("method", "param"), FIELDS)
def test_a_wrong_text_names_the_parameter_and_the_type(method, param):
    hint = field_types(METHODS[method])[param]
    members, _ = _members(hint)
    if len(members) > 1:
        pytest.skip(f"a union of {describe_type(hint)}: no one text is wrong for every member")
    wrong = _wrong(members[0])
    if wrong is None:  # every text reads as this type (str): check one that no other type takes
        assert coerce_params(method, {param: "abc,1.5"}) == {
            param: "abc,1.5" if hint is str else ("abc", 1.5)
        }
        return
    with pytest.raises(ValueError) as err:
        coerce_params(method, {param: wrong})
    message = str(err.value)
    assert message == f"{method}: parameter {param} takes {describe_type(hint)}, got {wrong!r}"
    assert "\n" not in message
    word = _WORDS.get(members[0])
    if word is None and typing.get_origin(members[0]) is tuple:
        word = "a tuple"
    if word is not None:
        assert word in message


@pytest.mark.parametrize(
    ("text", "ok"),
    [("16", 16), ("-3", -3), (" 8 ", 8), ("1.5", None), ("abc", None), ("true", None), ("", None)],
)
def test_int(text, ok):
    if ok is None:
        with pytest.raises(ValueError, match=r"snapkv: parameter window takes an int, got"):
            coerce_params("snapkv", {"window": text})
    else:
        assert coerce_params("snapkv", {"window": text}) == {"window": ok}


@pytest.mark.parametrize(("text", "ok"), [("0.5", 0.5), ("1", 1.0), ("1e-1", 0.1), ("x", None)])
def test_float(text, ok):
    if ok is None:
        with pytest.raises(ValueError, match=r"h2o: parameter recent_share takes a float, got 'x'"):
            coerce_params("h2o", {"recent_share": text})
    else:
        assert coerce_params("h2o", {"recent_share": text}) == {"recent_share": ok}


@pytest.mark.parametrize(
    ("text", "ok"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("False", False), ("0", False)]
    + [("No", False), ("2", None), ("maybe", None)],
)
def test_bool(text, ok):
    if ok is None:
        with pytest.raises(ValueError, match=r"streaming_llm: parameter every_step takes a bool"):
            coerce_params("streaming_llm", {"every_step": text})
    else:
        assert coerce_params("streaming_llm", {"every_step": text}) == {"every_step": ok}


@pytest.mark.parametrize(("text", "ok"), [("max", "max"), ("'max'", "max"), ('"avg"', "avg"), ("", "")])
def test_str(text, ok):
    assert coerce_params("snapkv", {"pooling": text}) == {"pooling": ok}


@dataclasses.dataclass
class _Shapes:
    layers: tuple[int, ...] = ()
    pair: tuple[int, str] = (0, "a")
    loose: tuple = ()
    maybe: tuple[int, ...] | None = None
    state: int = dataclasses.field(default=0, metadata={"internal": True})  # not a hyperparameter


@pytest.mark.parametrize(
    ("field", "text", "ok"),
    [
        ("layers", "0,1,23", (0, 1, 23)),
        ("layers", "(0, 1)", (0, 1)),
        ("layers", "[4]", (4,)),
        ("layers", "(5,)", (5,)),
        ("layers", "()", ()),
        ("layers", "", ()),
        ("layers", "0,x", None),
        ("layers", "0,,1", None),
        ("pair", "3,b", (3, "b")),
        ("pair", "3", None),
        ("loose", "1,a", (1, "a")),
        ("maybe", "none", None),
        ("maybe", "1,2", (1, 2)),
    ],
)
def test_tuple(monkeypatch, field, text, ok):
    monkeypatch.setitem(METHODS, "shapes", _Shapes)
    if ok is None and field != "maybe":
        with pytest.raises(ValueError, match=rf"shapes: parameter {field} takes a tuple"):
            coerce_params("shapes", {field: text})
    else:
        assert coerce_params("shapes", {field: text}) == {field: ok}


def test_internal_fields_are_not_parameters(monkeypatch):
    monkeypatch.setitem(METHODS, "shapes", _Shapes)
    assert "state" not in field_types(_Shapes)
    assert coerce_params("shapes", {"state": "x"}) == {"state": "x"}  # for get_method's "has no parameter"


def test_optional_accepts_none():
    assert coerce_params("zipcache", {"key_group": "none", "low_key_group": "64"}) == {
        "key_group": None,
        "low_key_group": 64,
    }
    with pytest.raises(ValueError, match=r"zipcache: parameter key_group takes an int or none, got 'x'"):
        coerce_params("zipcache", {"key_group": "x"})


def test_composed_methods_route_each_parameter_to_its_method():
    params = coerce_params("SnapKV+ZipCache", {"window": "8", "bits": "8", "key_group": "none"})
    assert params == {"window": 8, "bits": 8, "key_group": None}
    method = get_method("snapkv+zipcache", **params)
    assert method.eviction.window == 8 and method.quantization.bits == 8
    with pytest.raises(ValueError, match=r"^zipcache: parameter bits takes an int, got 'x'$"):
        coerce_params("snapkv+zipcache", {"bits": "x"})


def test_unknown_names_are_left_to_get_method():
    assert coerce_params("snapkv", {"nope": "1"}) == {"nope": "1"}
    with pytest.raises(ValueError, match="has no parameter nope"):
        get_method("snapkv", **coerce_params("snapkv", {"nope": "1"}))
    assert coerce_params("bogus", {"window": "abc"}) == {"window": "abc"}
    with pytest.raises(ValueError, match="unknown method"):
        get_method("bogus", **coerce_params("bogus", {"window": "abc"}))
    # a name both methods of a composition have stays text, for _compose's "belongs to both"
    assert coerce_params("kivi+zipcache", {"bits": "x"}) == {"bits": "x"}
    assert coerce_params("snapkv", {"window": 8}) == {"window": 8}  # already typed: passed through


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model: the parameter errors come first."""

    def load(args):
        raise AssertionError("the model was loaded before the parameters were checked")

    monkeypatch.setattr(commands, "_load", load)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "-p", "window=abc"], "snapkv: parameter window takes an int, got 'abc'"),
        (
            ["demo", "--method", "h2o", "-p", "recent_share=half"],
            "h2o: parameter recent_share takes a float, got 'half'",
        ),
        (
            ["profile", "-p", "distance=1.5"],
            "prefixkv: parameter distance takes an int, got '1.5'",
        ),
        (
            ["bench", "--methods", "snapkv,streaming_llm:every_step=maybe"],
            "streaming_llm: parameter every_step takes a bool (true/false, yes/no, 1/0), got 'maybe'",
        ),
        (["bench", "--methods", "snapkv:window"], "a method parameter is name=value, got 'window'"),
    ],
)
def test_cli_wrong_type_is_one_line_and_exit_2(no_model, capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"kvsqueeze: error: {message}\n"
    assert "Traceback" not in captured.err


def test_cli_typed_values_reach_the_method(no_model, monkeypatch):
    from kvsqueeze.bench.runner import MethodSpec

    assert commands._method_specs("h2o:recent_share=1,zipcache:key_group=none:bits=3") == [
        MethodSpec("h2o", {"recent_share": 1.0}),
        MethodSpec("zipcache", {"key_group": None, "bits": 3}),
    ]
    with pytest.raises(AssertionError, match="model was loaded"):  # valid: gets as far as the model
        main(["generate", "hi", "--method", "snapkv+kivi", "-p", "window=8", "-p", "key_pre_rope=yes"])


def test_entry_point_wrong_type_is_one_line_without_traceback():
    """The issue's command, as a real process: ``kvsqueeze generate -p window=abc``."""
    entry = "import sys; from kvsqueeze.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", entry, "generate", "hi", "-p", "window=abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == "kvsqueeze: error: snapkv: parameter window takes an int, got 'abc'\n"
