"""The layer notation (cnnkit.spec): every token kind, separators, case, round trip, errors."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnkit
from cnnkit.spec import ACTIVATIONS, Layer, SpecError, format_layer, format_spec, parse


def _fields(layer):
    """A layer's meaning, without where it was written (token text, position)."""
    return dataclasses.replace(layer, token="", position=0)


# token -> (expected fields, canonical token)
TOKENS = {
    "64C3": (dict(kind="conv", size=64, kernel=(3, 3), stride=1), "64C3"),
    "64C3x5": (dict(kind="conv", size=64, kernel=(3, 5), stride=1), "64C3x5"),
    "64C3x3": (dict(kind="conv", size=64, kernel=(3, 3), stride=1), "64C3"),
    "96C11s4p0": (dict(kind="conv", size=96, kernel=(11, 11), stride=4, padding=0), "96C11s4p0"),
    "64C3psame": (dict(kind="conv", size=64, kernel=(3, 3), stride=1, padding="same"), "64C3psame"),
    "64C3s2psame": (dict(kind="conv", size=64, kernel=(3, 3), stride=2, padding="same"), "64C3s2psame"),
    "64C3s1p1": (dict(kind="conv", size=64, kernel=(3, 3), stride=1, padding=1), "64C3p1"),
    "32LC3": (dict(kind="local", size=32, kernel=(3, 3), stride=1), "32LC3"),
    "32LC3x2s2": (dict(kind="local", size=32, kernel=(3, 2), stride=2), "32LC3x2s2"),
    "MP2": (dict(kind="maxpool", kernel=(2, 2), stride=2), "MP2"),
    "MP3s2": (dict(kind="maxpool", kernel=(3, 3), stride=2), "MP3s2"),
    "MP2s2": (dict(kind="maxpool", kernel=(2, 2), stride=2), "MP2"),
    "MP3s2p1": (dict(kind="maxpool", kernel=(3, 3), stride=2, padding=1), "MP3s2p1"),
    "MP2x4": (dict(kind="maxpool", kernel=(2, 4), stride=(2, 4)), "MP2x4"),  # stride = window, per axis
    "MP2x4s2x4": (dict(kind="maxpool", kernel=(2, 4), stride=(2, 4)), "MP2x4"),
    "MP2x4s2": (dict(kind="maxpool", kernel=(2, 4), stride=2), "MP2x4s2"),
    "AP3x1psame": (dict(kind="avgpool", kernel=(3, 1), stride=(3, 1), padding="same"), "AP3x1psame"),
    "MP3s2x1": (dict(kind="maxpool", kernel=(3, 3), stride=(2, 1)), "MP3s2x1"),
    "64C3s2x1p1": (dict(kind="conv", size=64, kernel=(3, 3), stride=(2, 1), padding=1), "64C3s2x1p1"),
    "R8s1x2": (dict(kind="residual", size=8, stride=(1, 2)), "R8s1x2"),
    "AP2": (dict(kind="avgpool", kernel=(2, 2), stride=2), "AP2"),
    "AP3s1psame": (dict(kind="avgpool", kernel=(3, 3), stride=1, padding="same"), "AP3s1psame"),
    "GAP": (dict(kind="gap"), "GAP"),
    "GMP": (dict(kind="gmp"), "GMP"),
    "FC256": (dict(kind="dense", size=256), "FC256"),
    "D0.5": (dict(kind="dropout", rate=0.5), "D0.5"),
    "D.25": (dict(kind="dropout", rate=0.25), "D0.25"),
    "D0": (dict(kind="dropout", rate=0.0), "D0"),
    "BN": (dict(kind="bn"), "BN"),
    "LRN": (dict(kind="lrn", size=5), "LRN"),
    "LRN5": (dict(kind="lrn", size=5), "LRN"),
    "LRN3": (dict(kind="lrn", size=3), "LRN3"),
    "R64": (dict(kind="residual", size=64, stride=1), "R64"),
    "R128s2": (dict(kind="residual", size=128, stride=2), "R128s2"),
    "R64s1": (dict(kind="residual", size=64, stride=1), "R64"),
    "64C3:tanh": (dict(kind="conv", size=64, kernel=(3, 3), stride=1, activation="tanh"), "64C3:tanh"),
    "32LC3:sigmoid": (dict(kind="local", size=32, kernel=(3, 3), stride=1, activation="sigmoid"), "32LC3:sigmoid"),
    "FC256:prelu": (dict(kind="dense", size=256, activation="prelu"), "FC256:prelu"),
    "R16s2:elu": (dict(kind="residual", size=16, stride=2, activation="elu"), "R16s2:elu"),
    "FC10:softmax": (dict(kind="dense", size=10, activation="softmax"), "FC10:softmax"),
}


@pytest.mark.parametrize("token", list(TOKENS))
def test_token_parses_to_its_fields(token):
    expected, _ = TOKENS[token]
    (layer,) = parse(token)
    assert _fields(layer) == Layer(**expected)
    assert layer.token == token
    assert layer.position == 1


@pytest.mark.parametrize("token", list(TOKENS))
def test_token_formats_canonically_and_round_trips(token):
    _, canonical = TOKENS[token]
    (layer,) = parse(token)
    assert format_layer(layer) == canonical
    assert str(layer) == canonical
    (again,) = parse(canonical)
    assert _fields(again) == _fields(layer)


@pytest.mark.parametrize("token", list(TOKENS))
def test_token_is_case_insensitive(token):
    expected, canonical = TOKENS[token]
    for variant in (token.lower(), token.upper(), token.swapcase()):
        (layer,) = parse(variant)
        assert _fields(layer) == Layer(**expected), variant
        assert format_layer(layer) == canonical


def test_docstring_examples():
    assert [layer.kind for layer in parse("20C5-MP2-50C5:tanh-MP2-FC500-D0.5")] == [
        "conv", "maxpool", "conv", "maxpool", "dense", "dropout",
    ]
    assert format_spec(parse("96c11S4P0--mp3s2")) == "96C11s4p0-MP3s2"
    assert format_spec(parse("20c5--mp2--fc500")) == "20C5-MP2-FC500"


def test_single_and_double_dash_separators_are_the_same_spec():
    single = parse("20C5-MP2-50C5-MP2-FC256")
    double = parse("20C5--MP2--50C5--MP2--FC256")
    mixed = parse("20C5-MP2--50C5-MP2--FC256")
    assert [_fields(layer) for layer in single] == [_fields(layer) for layer in double]
    assert [_fields(layer) for layer in single] == [_fields(layer) for layer in mixed]
    # Positions count tokens, not dashes.
    assert [layer.position for layer in double] == [1, 2, 3, 4, 5]
    assert format_spec(double) == "20C5-MP2-50C5-MP2-FC256"


def test_whitespace_around_spec_and_tokens_is_ignored():
    assert format_spec(parse("  20C5 - MP2 -- FC10 ")) == "20C5-MP2-FC10"


def test_full_spec_round_trip_to_canonical():
    spec = "96c11S4P0--lrn--mp3S2--256c5P2--lrn--MP3s2-384C3p1-FC4096:RELU-d0.5-Gap-r64s2:Tanh-32lc3X2-bn"
    canonical = "96C11s4p0-LRN-MP3s2-256C5p2-LRN-MP3s2-384C3p1-FC4096:relu-D0.5-GAP-R64s2:tanh-32LC3x2-BN"
    assert format_spec(parse(spec)) == canonical
    assert format_spec(parse(canonical)) == canonical
    assert [layer.position for layer in parse(spec)] == list(range(1, 14))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_known_activation_is_accepted_on_every_token_that_takes_one(activation):
    for body, kind in (("8C3", "conv"), ("8LC3", "local"), ("FC8", "dense"), ("R8", "residual")):
        (layer,) = parse(f"{body}:{activation.upper()}")
        assert layer.kind == kind
        assert layer.activation == activation
        assert format_layer(layer) == f"{body}:{activation}"


# --- errors --------------------------------------------------------------------------------


def _spec_error(spec):
    with pytest.raises(SpecError) as info:
        parse(spec)
    return info.value


def test_spec_error_is_a_value_error_and_exported():
    assert issubclass(SpecError, ValueError)
    assert cnnkit.SpecError is SpecError


def test_bad_token_names_token_and_1_based_position():
    error = _spec_error("64C3-XX-FC10")
    assert error.token == "XX"
    assert error.position == 2
    assert "token 2 'XX'" in str(error)
    assert "not a layer" in str(error)


def test_bad_token_position_counts_tokens_with_double_dashes():
    error = _spec_error("64C3--MP2--FC10--64Q3")
    assert (error.token, error.position) == ("64Q3", 4)
    assert "token 4 '64Q3'" in str(error)


def test_first_bad_token_is_reported():
    error = _spec_error("XX-YY")
    assert (error.token, error.position) == ("XX", 1)


def test_bad_activation_names_it():
    error = _spec_error("64C3-MP2-FC10:tanhh")
    assert (error.token, error.position) == ("FC10:tanhh", 3)
    assert "unknown activation 'tanhh'" in str(error)
    assert "relu" in str(error)  # lists the known ones


@pytest.mark.parametrize("token", ["MP2:relu", "AP2:tanh", "GAP:relu", "GMP:relu", "D0.5:relu", "BN:relu",
                                   "LRN:relu", "LRN3:tanh"])
def test_activation_on_token_that_takes_none(token):
    error = _spec_error(f"8C3-{token}")
    assert (error.token, error.position) == (token, 2)
    assert "activation override applies only to C, LC, FC and R" in str(error)


@pytest.mark.parametrize("token", ["D1.5", "D1", "D1.0", "D2"])
def test_dropout_rate_must_be_below_one(token):
    error = _spec_error(f"FC8-{token}")
    assert (error.token, error.position) == (token, 2)
    assert "dropout rate must be in [0, 1)" in str(error)


@pytest.mark.parametrize("token", ["64C3s0", "32LC3s0", "MP2s0", "AP3s0", "R64s0", "64C3s1x0", "MP2s0x2"])
def test_zero_stride(token):
    error = _spec_error(token)
    assert (error.token, error.position) == (token, 1)
    assert "stride must be at least 1" in str(error)


@pytest.mark.parametrize("token, message", [
    ("0C3", "at least one filter"),
    ("0LC3", "at least one filter"),
    ("FC0", "at least one filter or unit"),
    ("R0", "at least one filter"),
    ("64C0", "window must be at least 1x1"),
    ("64C3x0", "window must be at least 1x1"),
    ("MP0", "window must be at least 1x1"),
])
def test_zero_sizes(token, message):
    error = _spec_error(token)
    assert (error.token, error.position) == (token, 1)
    assert message in str(error)


@pytest.mark.parametrize("token", ["C3", "64C", "64C3p", "64C3s", "64C3pvalid", "64C3s2x", "MP", "FC", "FC2.5",
                                   "D", "D-0.5", "R", "R64x3", "R64p1", "GAPP", "64", "64 C3", "LC3"])
def test_malformed_tokens(token):
    error = _spec_error(f"8C3-{token}-FC10")
    assert error.position == 2  # "D-0.5" splits into "D" and "0.5": "D" is token 2
    assert "not a layer" in str(error)


@pytest.mark.parametrize("token, fixed", [
    ("96C11p0s4", "96C11s4p0"), ("64c3P1S2:tanh", "64c3S2P1:tanh"), ("MP3psames2", "MP3s2psame"),
    ("8LC3p0s2x1", "8LC3s2x1p0"),
])
def test_padding_before_stride_says_the_order(token, fixed):
    error = _spec_error(f"8C3-{token}")
    assert (error.token, error.position) == (token, 2)
    assert str(error) == f"token 2 {token!r}: the stride comes before the padding: write {fixed!r}"
    parse(fixed)  # and the suggestion parses


def test_pool_stride_defaults_to_its_window_per_axis():
    (pool,) = parse("MP2x4")
    assert pool.stride == (2, 4)
    assert parse("AP1x3")[0].stride == (1, 3)
    assert parse("MP2x4s2")[0].stride == (2, 2)  # an explicit s applies to both axes
    assert parse("8C3x5")[0].stride == (1, 1)


def test_layer_takes_an_int_stride_as_a_pair():
    assert Layer("conv", size=8, kernel=(3, 3), stride=2).stride == (2, 2)
    assert Layer("maxpool", kernel=(2, 4), stride=[2, 4]) == Layer("maxpool", kernel=(2, 4), stride=(2, 4))
    assert format_layer(Layer("maxpool", kernel=(2, 4), stride=(2, 4))) == "MP2x4"


def test_a_layer_built_by_hand_takes_the_defaults_parse_gives():
    for token, layer in [("64C3", Layer("conv", size=64, kernel=3)), ("MP2x4", Layer("maxpool", kernel=(2, 4))),
                         ("R64", Layer("residual", size=64)), ("8LC5", Layer("local", size=8, kernel=[5, 5]))]:
        assert _fields(layer) == _fields(parse(token)[0]), token
        assert format_layer(layer) == token
    assert format_layer(Layer("dropout", rate=np.float64(0.5))) == "D0.5"  # a NumPy rate, as from a sweep


@pytest.mark.parametrize("spec", ["", "   ", None, 42, ["64C3"]])
def test_empty_or_non_string_spec(spec):
    error = _spec_error(spec)
    assert "non-empty string" in str(error)
    assert error.token is None and error.position is None


def test_empty_token_between_separators_is_an_error():
    error = _spec_error("8C3- -FC10")
    assert error.position == 2
    assert error.token == ""


def test_format_layer_rejects_unknown_kind():
    with pytest.raises(SpecError, match="has no token"):
        format_layer(Layer("flatten"))


# --- properties ----------------------------------------------------------------------------

_ACTIVATION = st.one_of(st.none(), st.sampled_from(ACTIVATIONS))
_KERNEL = st.tuples(st.integers(1, 12), st.integers(1, 12))
_PADDING = st.one_of(st.none(), st.integers(0, 5), st.just("same"))
_STRIDE = st.one_of(st.integers(1, 5), st.tuples(st.integers(1, 5), st.integers(1, 5)))


def _window_layer(kind):
    def make(size, kernel, stride, padding, activation):
        if kind in ("maxpool", "avgpool"):
            size, activation = None, None
        if kind == "local":
            padding = None if padding == "same" else padding
        return Layer(kind, size=size, kernel=kernel, stride=stride, padding=padding, activation=activation)

    return st.builds(make, st.integers(1, 512), _KERNEL, _STRIDE, _PADDING, _ACTIVATION)


LAYERS = st.one_of(
    _window_layer("conv"),
    _window_layer("local"),
    _window_layer("maxpool"),
    _window_layer("avgpool"),
    st.builds(lambda: Layer("gap")),
    st.builds(lambda: Layer("gmp")),
    st.builds(lambda: Layer("bn")),
    st.builds(lambda n, a: Layer("dense", size=n, activation=a), st.integers(1, 5000), _ACTIVATION),
    st.builds(lambda rate: Layer("dropout", rate=rate), st.floats(0, 1, exclude_max=True)),
    st.builds(lambda n: Layer("lrn", size=n), st.integers(1, 11)),
    st.builds(lambda n, s, a: Layer("residual", size=n, stride=s, activation=a),
              st.integers(1, 512), _STRIDE, _ACTIVATION),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LAYERS, min_size=1, max_size=10), st.sampled_from(["-", "--"]), st.randoms(use_true_random=False))
def test_round_trip_property(layers, separator, rng):
    canonical = format_spec(layers)
    # Same text joined by "--" and in random letter case means the same network.
    text = separator.join(format_layer(layer) for layer in layers)
    text = "".join(ch.upper() if rng.random() < 0.5 else ch.lower() for ch in text)
    parsed = parse(text)
    assert [_fields(layer) for layer in parsed] == [_fields(layer) for layer in layers]
    assert format_spec(parsed) == canonical
    assert [layer.position for layer in parsed] == list(range(1, len(layers) + 1))
    assert all(layer.token for layer in parsed)


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(alphabet="0123456789CcLlMmPpAaGgFfDdBbNnRrSsXx:-", min_size=1, max_size=20))
def test_parse_either_succeeds_canonically_or_raises_spec_error(text):
    try:
        layers = parse(text)
    except SpecError as error:
        if error.position is not None:
            assert error.position >= 1
            assert f"token {error.position} {error.token!r}" in str(error)
        return
    canonical = format_spec(layers)
    assert format_spec(parse(canonical)) == canonical
    assert [_fields(layer) for layer in parse(canonical)] == [_fields(layer) for layer in layers]


@pytest.mark.parametrize("rate", [0.00001, 0.1234567, 0.5, 0.0])
def test_dropout_rates_format_exactly(rate):
    text = format_spec(parse(f"D{rate:.7f}"))
    assert "e" not in text and parse(text)[0].rate == rate


@pytest.mark.parametrize("spec, position", [("64C3:", 1), ("-64C3", 1), ("64C3-", 2), ("64C3---MP2", 2)])
def test_empty_tokens_and_activations_are_errors(spec, position):
    with pytest.raises(SpecError) as caught:
        parse(spec)
    assert caught.value.position == position
