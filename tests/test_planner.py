"""cnnkit.plan: shapes, parameters, MACs, receptive fields, notes, classifier, memory, BN option."""

import math
import re

import numpy as np
import pytest

import cnnkit
from cnnkit.planner import DEFAULT_OPTIONS, MemoryEstimate, Plan, Row, plan
from cnnkit.spec import SpecError

ALEXNET_CONV1 = "(W - F + 2P)/S + 1 = (224 - 11 + 0)/4 + 1 = 54.25 is not an integer"


def _row(p, name):
    (row,) = [row for row in p.rows if row.name == name]
    return row


# --- the checks --------------------------------------------------------------------


def test_alexnet_conv1_on_224_fails_with_cs231n_formula():
    with pytest.raises(SpecError) as info:
        plan("96C11s4p0-MP3s2", (224, 224, 3))
    assert ALEXNET_CONV1 in str(info.value)
    assert info.value.token == "96C11s4p0"
    assert info.value.position == 1
    assert str(info.value) == f"token 1 '96C11s4p0': {ALEXNET_CONV1}"


def test_alexnet_conv1_on_227():
    p = plan("96C11s4p0-MP3s2", (227, 227, 3))
    first = p.rows[0]
    assert isinstance(p, Plan) and isinstance(first, Row)
    assert first.name == "conv1"
    assert first.output_shape == (55, 55, 96)
    assert first.params == 34_944 == 11 * 11 * 3 * 96 + 96
    assert first.macs == 55 * 55 * 11 * 11 * 3 * 96
    assert first.receptive_field == (11, 11)
    assert p.rows[1].output_shape == (27, 27, 96)  # (55 - 3)/2 + 1
    assert p.rows[1].receptive_field == (11 + 2 * 4, 11 + 2 * 4)
    text = str(p)
    assert "55x55x96" in text
    assert "34,944" in text
    assert "27x27x96" in text
    assert "227x227x3" in text  # the input row
    assert "total: 34,944 parameters (34,944 trainable)" in text


def test_plan_is_exported_lazily():
    assert cnnkit.plan is plan
    assert cnnkit.Plan is Plan


def test_formula_uses_padding_and_stride_of_the_failing_layer():
    with pytest.raises(SpecError) as info:
        plan("8C3-16C4s2p1-FC10", (9, 9, 1))  # 7 -> (7 - 4 + 2)/2 + 1 = 3.5
    assert info.value.position == 2 and info.value.token == "16C4s2p1"
    assert "(W - F + 2P)/S + 1 = (7 - 4 + 2)/2 + 1 = 3.5 is not an integer" in str(info.value)


def test_formula_names_the_height_axis_when_only_height_fails():
    with pytest.raises(SpecError) as info:
        plan("8C3s2", (8, 9, 1))
    assert "(H - F + 2P)/S + 1 = (8 - 3 + 0)/2 + 1 = 3.5 is not an integer" in str(info.value)


def test_window_larger_than_input():
    with pytest.raises(SpecError) as info:
        plan("8C5-8C5", (8, 8, 1))
    assert info.value.position == 2
    assert "(4 - 5 + 0)/1 + 1 = 0" in str(info.value)
    assert "larger than the padded input" in str(info.value)
    with pytest.raises(SpecError, match="larger than the padded input"):
        plan("MP3", (2, 2, 1))


def test_locally_connected_must_tile_too():
    with pytest.raises(SpecError, match=r"\(8 - 3 \+ 0\)/2 \+ 1 = 3.5 is not an integer"):
        plan("4LC3s2", (8, 8, 1))


# --- hand-checked small network ------------------------------------------------------------


def test_lenet_like_shapes_params_macs_receptive_fields():
    p = plan("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10)
    expected = [
        # name, shape, params, MACs, receptive field
        ("conv1", (24, 24, 20), 5 * 5 * 1 * 20 + 20, 24 * 24 * 20 * 25, (5, 5)),
        ("pool1", (12, 12, 20), 0, 0, (6, 6)),
        ("conv2", (8, 8, 50), 5 * 5 * 20 * 50 + 50, 8 * 8 * 50 * 5 * 5 * 20, (14, 14)),
        ("pool2", (4, 4, 50), 0, 0, (16, 16)),
        ("flatten", (800,), 0, 0, (28, 28)),
        ("fc1", (256,), 800 * 256 + 256, 800 * 256, (28, 28)),
        ("classifier", (10,), 256 * 10 + 10, 256 * 10, (28, 28)),
    ]
    assert [(r.name, r.output_shape, r.params, r.macs, r.receptive_field) for r in p.rows] == expected
    assert p.params == 520 + 25_050 + 205_056 + 2_570 == 233_196
    assert p.trainable_params == p.params
    assert p.macs == 288_000 + 1_600_000 + 204_800 + 2_560
    assert p.output_shape == (10,)
    assert p.num_classes == 10 and p.input_shape == (28, 28, 1)
    assert p.spec == "20C5-MP2-50C5-MP2-FC256"
    # defaults filled in: relu, valid padding (p0), softmax classifier
    assert [r.layer.activation for r in p.rows] == ["relu", None, "relu", None, None, "relu", "softmax"]
    assert p.rows[0].layer.padding == 0 and p.rows[0].token == "20C5p0"
    assert all(row.use_bias for row in p.rows)
    text = str(p)
    assert "24x24x20" in text and "288,000" in text and "14x14" in text
    assert "total: 233,196 parameters (233,196 trainable), 2,095,360 multiply-accumulates per image" in text


def test_receptive_field_with_strides_and_asymmetric_kernels():
    p = plan("4C3x5s2-MP2-4C3", (31, 33, 1))
    conv1, pool1, conv2 = p.rows
    assert conv1.output_shape == (15, 15, 4)  # (31-3)/2+1, (33-5)/2+1
    assert conv1.receptive_field == (3, 5)
    assert pool1.receptive_field == (3 + 1 * 2, 5 + 1 * 2)  # jump 2
    assert conv2.receptive_field == (5 + 2 * 4, 7 + 2 * 4)  # jump 4
    assert conv1.macs == 15 * 15 * 3 * 5 * 1 * 4


def test_same_padding_ceil_division():
    p = plan("4C3s2psame-MP2psame", (7, 7, 1))
    assert p.rows[0].output_shape == (4, 4, 4)
    assert p.rows[1].output_shape == (2, 2, 4)
    p = plan("4C3s2", (9, 9, 1), padding="same")
    assert p.rows[0].output_shape == (5, 5, 4)
    assert p.rows[0].layer.padding == "same"


def test_explicit_padding():
    p = plan("4C5p2-4C3x1p1", (8, 8, 2))
    assert p.rows[0].output_shape == (8, 8, 4)
    assert p.rows[1].output_shape == (8, 10, 4)  # (8-3+2)+1, (8-1+2)+1


def test_locally_connected_params():
    p = plan("4LC3", (6, 6, 2))
    (row,) = p.rows
    assert row.name == "local1"
    assert row.output_shape == (4, 4, 4)
    assert row.params == 4 * 4 * (3 * 3 * 2 * 4 + 4)
    assert row.macs == 4 * 4 * 3 * 3 * 2 * 4


def test_locally_connected_rejects_padding():
    with pytest.raises(SpecError, match="take no padding") as info:
        plan("8C3-4LC3p1", (8, 8, 1))
    assert info.value.position == 2
    plan("4LC3p0", (8, 8, 1))  # p0 is no padding


def test_residual_block_math():
    p = plan("R8s2", (8, 8, 4))
    (row,) = p.rows
    assert row.name == "residual1"
    assert row.output_shape == (4, 4, 8)
    conv = 9 * 4 * 8 + 9 * 8 * 8
    projection = 4 * 8
    bn = 4 * 8 * 3  # bn1, bn2, proj_bn: gamma, beta, moving mean, moving variance
    assert row.params == conv + projection + bn
    assert row.trainable_params == conv + projection + 2 * 8 * 3
    assert row.macs == 4 * 4 * (conv + projection)
    assert row.note == "projection shortcut"
    assert row.receptive_field == (1 + 2 + 2 * 2, 1 + 2 + 2 * 2)
    identity = plan("R4", (5, 5, 4)).rows[0]
    assert identity.params == 2 * 9 * 4 * 4 + 8 * 4
    assert identity.note == ""
    assert identity.output_shape == (5, 5, 4)
    assert plan("R4s2", (5, 5, 4)).rows[0].output_shape == (3, 3, 4)  # ceil, like 'same'


def test_zero_padded_residual_shortcut_has_no_parameters():
    projected = plan("R8s2", (8, 8, 4)).rows[0]
    (row,) = plan("R8s2", (8, 8, 4), shortcut="zero_pad").rows
    assert row.output_shape == (4, 4, 8)
    assert row.params == projected.params - (4 * 8 + 4 * 8) == 9 * 4 * 8 + 9 * 8 * 8 + 8 * 8
    assert row.trainable_params == row.params - 2 * 2 * 8
    assert row.macs == 4 * 4 * (9 * 4 * 8 + 9 * 8 * 8)
    assert row.note == "zero-padded shortcut"
    assert row.receptive_field == projected.receptive_field
    narrowing = plan("R4", (5, 5, 8), shortcut="zero_pad").rows[0]  # zero padding cannot narrow: projects
    assert narrowing.note == "projection shortcut"
    assert plan("R4", (5, 5, 4), shortcut="zero_pad").rows[0].note == ""


def test_non_square_pool_strides_by_its_window_per_axis():
    # README: "stride = size unless s given", for each axis: MP2x4 tiles 2x4 windows.
    p = plan("MP2x4-4C1", (8, 8, 1))
    pool, conv = p.rows
    assert pool.output_shape == (4, 2, 1)
    assert pool.note == ""
    assert pool.receptive_field == (2, 4)
    assert conv.receptive_field == (2, 4)  # jump (2, 4): a 1x1 conv sees one window
    assert plan("MP2x4-4C3", (8, 16, 1)).rows[1].receptive_field == (2 + 2 * 2, 4 + 2 * 4)
    assert plan("AP3x2", (9, 9, 1)).rows[0].output_shape == (3, 4, 1)
    assert plan("AP3x2", (9, 9, 1)).rows[0].note == "floor drops 1 of W"
    assert plan("MP2x4s2", (8, 8, 1)).rows[0].output_shape == (4, 3, 1)  # explicit s: both axes
    assert plan("MP2x4psame", (7, 7, 1)).rows[0].output_shape == (4, 2, 1)


def test_stride_pairs_in_the_formula():
    assert plan("4C3s1x2", (8, 9, 1)).rows[0].output_shape == (6, 4, 4)
    with pytest.raises(SpecError, match=r"\(W - F \+ 2P\)/S \+ 1 = \(8 - 3 \+ 0\)/2 \+ 1 = 3.5"):
        plan("4C3s1x2", (8, 8, 1))
    assert plan("R4s2x1", (5, 5, 4)).rows[0].output_shape == (3, 5, 4)


def test_gap_gmp_dropout_lrn_bn_rows():
    p = plan("4C3-LRN3-BN-D0.5-GAP", (6, 6, 2))
    assert [r.name for r in p.rows] == ["conv1", "lrn1", "bn1", "dropout1", "gap1"]
    assert [r.output_shape for r in p.rows] == [(4, 4, 4)] * 4 + [(4,)]
    assert p.rows[2].params == 16 and p.rows[2].trainable_params == 8
    assert p.rows[-1].receptive_field == (6, 6)  # a pooled unit sees the whole image
    assert "all" in str(p).splitlines()[-3]
    assert plan("4C3-GMP", (6, 6, 2)).rows[-1].name == "gmp1"


def test_even_lrn_window_is_an_error():
    with pytest.raises(SpecError, match="odd") as info:
        plan("4C3-LRN4", (6, 6, 2))
    assert info.value.position == 2


def test_pooling_floors_with_a_note():
    p = plan("8C3-MP2", (9, 9, 1))
    pool = p.rows[1]
    assert pool.output_shape == (3, 3, 8)
    assert pool.note == "floor drops 1 of H; floor drops 1 of W"
    assert "floor drops 1 of H" in str(p)
    assert p.rows[0].note == ""
    assert plan("MP3s2", (8, 9, 1)).rows[0].note == "floor drops 1 of H"  # (8-3)/2 = 2.5; (9-3)/2 = 3
    assert plan("MP2", (8, 8, 1)).rows[0].note == ""


# --- classifier, flatten, order ------------------------------------------------------------


def test_classifier_appended():
    p = plan("8C3-FC16", (8, 8, 1), 10)
    assert [r.name for r in p.rows] == ["conv1", "flatten", "fc1", "classifier"]
    assert p.rows[-1].layer.activation == "softmax"
    assert p.rows[-1].token == "FC10"
    assert p.rows[2].layer.activation == "relu"


def test_classifier_not_appended_when_spec_ends_with_it():
    p = plan("8C3-FC10", (8, 8, 1), 10)
    assert [r.name for r in p.rows] == ["conv1", "flatten", "classifier"]
    assert p.rows[-1].layer.activation == "softmax"
    assert p.rows[-1].layer.position == 2
    p = plan("8C3-FC10:softmax", (8, 8, 1), 10)
    assert [r.name for r in p.rows] == ["conv1", "flatten", "classifier"]


def test_classifier_appended_when_last_fc_differs_or_has_another_activation():
    assert [r.name for r in plan("8C3-FC10", (8, 8, 1), 5).rows] == ["conv1", "flatten", "fc1", "classifier"]
    p = plan("8C3-FC10:tanh", (8, 8, 1), 10)
    assert [r.name for r in p.rows] == ["conv1", "flatten", "fc1", "classifier"]
    assert p.rows[2].layer.activation == "tanh"
    p = plan("FC10-D0.5", (8, 8, 1), 10)
    assert [r.name for r in p.rows] == ["flatten", "fc1", "dropout1", "classifier"]


def test_no_classifier_without_num_classes():
    p = plan("8C3-FC10", (8, 8, 1))
    assert [r.name for r in p.rows] == ["conv1", "flatten", "fc1"]
    assert p.rows[-1].layer.activation == "relu"
    assert p.num_classes is None
    assert plan("8C3-GAP", (8, 8, 1)).output_shape == (8,)


def test_flatten_inserted_once_and_not_after_global_pooling():
    p = plan("8C3-FC16-FC16", (8, 8, 1), 3)
    assert [r.layer.kind for r in p.rows] == ["conv", "flatten", "dense", "dense", "dense"]
    assert p.rows[1].output_shape == (6 * 6 * 8,)
    assert p.rows[1].params == 0 and p.rows[1].token == ""
    p = plan("8C3-GAP-FC16", (8, 8, 1), 3)
    assert "flatten" not in [r.layer.kind for r in p.rows]
    assert p.rows[2].params == 8 * 16 + 16
    p = plan("FC16", (4, 4, 3), 3)
    assert p.rows[0].name == "flatten" and p.rows[0].output_shape == (48,)


@pytest.mark.parametrize("spec, position, token", [
    ("FC10-8C3", 2, "8C3"),
    ("8C3-FC10-MP2", 3, "MP2"),
    ("8C3-GAP-MP2", 3, "MP2"),
    ("8C3-GMP-8C1", 3, "8C1"),
    ("8C3-FC10-LRN", 3, "LRN"),
    ("8C3-GAP-R8", 3, "R8"),
    ("FC8-GAP", 2, "GAP"),
    ("8C3-FC8-4LC1", 3, "4LC1"),
])
def test_spatial_token_after_fc_or_global_pool(spec, position, token):
    with pytest.raises(SpecError, match="needs a spatial") as info:
        plan(spec, (8, 8, 1), 10)
    assert (info.value.position, info.value.token) == (position, token)


def test_bn_and_dropout_after_fc_are_fine():
    p = plan("8C3-FC16-BN-D0.5", (8, 8, 1), 10)
    assert [r.name for r in p.rows] == ["conv1", "flatten", "fc1", "bn1", "dropout1", "classifier"]
    fc1, bn1 = p.rows[2], p.rows[3]
    assert fc1.layer.activation == "linear" and not fc1.use_bias
    assert fc1.params == 6 * 6 * 8 * 16
    assert bn1.layer.activation == "relu" and bn1.params == 4 * 16


# --- options -------------------------------------------------------------------------------


def test_batch_norm_option_inserts_bn_and_moves_activation():
    p = plan("8C3-8C3:tanh-4LC3-MP2-FC8", (12, 12, 1), 4, batch_norm=True)
    assert [r.name for r in p.rows] == [
        "conv1", "bn1", "conv2", "bn2", "local1", "bn3", "pool1", "flatten", "fc1", "classifier",
    ]
    conv1, bn1, conv2, bn2, local1, bn3 = p.rows[:6]
    for weighted, bn, activation in ((conv1, bn1, "relu"), (conv2, bn2, "tanh"), (local1, bn3, "relu")):
        assert weighted.layer.activation == "linear"
        assert not weighted.use_bias
        assert bn.layer.activation == activation
    assert conv1.params == 9 * 8  # no bias
    assert bn1.params == 4 * 8 and bn1.trainable_params == 2 * 8
    assert local1.params == 6 * 6 * 9 * 8 * 4  # no per-position bias
    assert p.rows[-2].use_bias and p.rows[-2].layer.activation == "relu"  # dense: no BN inserted
    plain = plan("8C3-8C3:tanh-4LC3-MP2-FC8", (12, 12, 1), 4)
    assert p.params == plain.params - 8 - 8 - 6 * 6 * 4 + 4 * (8 + 8 + 4)
    assert p.trainable_params == p.params - 2 * (8 + 8 + 4)


def test_batch_norm_option_does_not_double_an_explicit_bn():
    p = plan("8C3-BN-8C3", (8, 8, 1), batch_norm=True)
    assert [r.layer.kind for r in p.rows] == ["conv", "bn", "conv", "bn"]


def test_explicit_bn_moves_activation_from_conv():
    p = plan("8C3:elu-BN-MP2", (8, 8, 1))
    assert p.rows[0].layer.activation == "linear" and not p.rows[0].use_bias
    assert p.rows[1].layer.activation == "elu"
    assert p.rows[0].params == 72


def test_activation_and_padding_options():
    p = plan("8C3-8C3:relu-FC8", (8, 8, 1), 3, activation="tanh", padding="same")
    assert [r.layer.activation for r in p.rows] == ["tanh", "relu", None, "tanh", "softmax"]
    assert p.rows[0].output_shape == (8, 8, 8)
    assert p.rows[0].layer.padding == "same"
    assert p.options["activation"] == "tanh"
    assert set(p.options) == set(DEFAULT_OPTIONS)


def test_prelu_parameters_are_counted():
    p = plan("8C3-FC4", (6, 6, 2), 3, activation="prelu")
    conv1, _, fc1, classifier = p.rows
    assert conv1.params == 9 * 2 * 8 + 8 + 8  # shared over height and width: one per channel
    assert fc1.params == 4 * 4 * 8 * 4 + 4 + 4
    assert classifier.params == 4 * 3 + 3
    r = plan("R4:prelu", (5, 5, 4)).rows[0]
    assert r.params == 2 * 9 * 4 * 4 + 8 * 4 + 2 * 4  # inner and outer PReLU


def test_registered_names_resolve_with_their_options():
    p = plan("lenet", (28, 28, 1), 10)
    assert p.spec == "20C5-MP2-50C5-MP2-FC500"
    assert p.options["activation"] == "tanh" and p.options["initializer"] == "theano"
    assert p.rows[0].layer.activation == "tanh"
    assert plan("lenet", (28, 28, 1), 10, activation="relu").rows[0].layer.activation == "relu"
    assert plan("vgg_small", (16, 16, 3), 10).rows[0].output_shape == (16, 16, 64)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(input_shape=(28, 28)), "input_shape"),
    (dict(input_shape=(28, 28, 1, 1)), "input_shape"),
    (dict(input_shape=(0, 28, 1)), "input_shape"),
    (dict(input_shape="28x28"), "input_shape"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=2.5), "num_classes"),
    (dict(activation="relux"), "activation"),
    (dict(padding="full"), "padding"),
    (dict(bogus=1), "bogus"),
    (dict(batch_norm="false"), "batch_norm must be True or False. Received: batch_norm='false'"),
    (dict(batch_norm=1), "batch_norm must be True or False"),
    (dict(max_norm=-1), "max_norm must be None or a number > 0. Received: max_norm=-1"),
    (dict(max_norm=0), "max_norm must be None or a number > 0"),
    (dict(max_norm="2"), "max_norm must be None or a number > 0"),
    (dict(l2=-1e-4), "l2 must be None or a number >= 0"),
    (dict(l2="x"), "l2 must be None or a number >= 0"),
    (dict(l2=float("nan")), "l2 must be None or a number >= 0"),
    (dict(shortcut="A"), "shortcut must be one of"),
])
def test_invalid_plan_arguments(kwargs, needle):
    args = dict(arch="8C3", input_shape=(8, 8, 1), num_classes=None)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        plan(**args)
    assert needle in str(info.value)
    assert not isinstance(info.value, SpecError)


def test_valid_option_values_are_accepted():
    for options in (dict(batch_norm=True, max_norm=3, l2=0), dict(max_norm=0.5, l2=None), dict(shortcut="zero_pad")):
        assert plan("8C3", (8, 8, 1), **options).options["max_norm"] == options.get("max_norm")


# --- memory --------------------------------------------------------------------------------


def test_memory_estimate_arithmetic():
    p = plan("FC4", (2, 2, 1), 2)
    # rows: flatten (4), fc1 (4, relu), classifier (2, softmax); params 4*4+4 + 4*2+2 = 30
    assert p.params == 30
    stored = 4 + 4 + 4 + 4 * 2 + 2 * 2  # input, rescaled, flatten, fc1 + relu, classifier + softmax
    sgd = p.memory(batch_size=3, optimizer="sgd")
    assert isinstance(sgd, MemoryEstimate)
    assert (sgd.weights, sgd.gradients, sgd.optimizer_state) == (120, 120, 0)
    assert sgd.activations == 2 * 3 * stored * 4  # forward and backward, float32
    assert sgd.total == 120 + 120 + 0 + 2 * 3 * stored * 4
    assert sgd.batch_size == 3 and sgd.precision == "float32"
    assert p.memory(batch_size=3, optimizer="momentum").optimizer_state == 120
    assert p.memory(batch_size=3, optimizer="nesterov").optimizer_state == 120
    assert p.memory(batch_size=3, optimizer="rmsprop").optimizer_state == 240  # velocities and momentums
    adam = p.memory(batch_size=3, optimizer="adam")
    assert adam.optimizer_state == 240
    assert p.memory(batch_size=3, optimizer="adamw").optimizer_state == 240
    bf16 = p.memory(batch_size=3, optimizer="adam", precision="mixed_bfloat16")
    assert bf16.activations == 2 * 3 * stored * 2
    assert (bf16.weights, bf16.gradients, bf16.optimizer_state) == (120, 120, 240)  # variables stay float32
    assert p.memory(batch_size=3, precision="mixed_float16").activations == bf16.activations
    assert p.memory().batch_size == 128 and p.memory().precision == "float32"
    assert p.memory().optimizer_state == adam.optimizer_state  # adam is the default
    text = str(adam)
    assert text.startswith("training memory estimate (batch 3, float32):")
    assert "weights 0.0 MiB" in text


def test_memory_optimizer_state_is_what_each_recipe_optimizer_keeps():
    from cnnkit.recipes.optimization import OPTIMIZERS, make_optimizer

    p = plan("FC4", (2, 2, 1), 2)
    model = cnnkit.build("FC4", (2, 2, 1), 2)
    for name in OPTIMIZERS:
        optimizer = make_optimizer(name, learning_rate=0.01, steps_per_epoch=1, epochs=1)
        optimizer.build(model.trainable_variables)
        state = sum(math.prod(v.shape) for v in optimizer.variables if len(v.shape))  # not the scalars
        assert p.memory(optimizer=name).optimizer_state == 4 * state, name
    with pytest.raises(ValueError, match=re.escape(f"optimizer must be one of {sorted(OPTIMIZERS)}. Received: "
                                                   "optimizer='lamb'")):
        p.memory(optimizer="lamb")


def test_memory_counts_only_trainable_for_gradients_and_optimizer():
    p = plan("FC4-BN", (2, 2, 1), 2)
    assert p.params == 4 * 4 + 4 * 4 + 4 * 2 + 2  # fc without bias, BN, classifier
    assert p.trainable_params == p.params - 2 * 4
    m = p.memory(batch_size=1, optimizer="adam")
    assert m.weights == 4 * p.params
    assert m.gradients == 4 * p.trainable_params
    assert m.optimizer_state == 8 * p.trainable_params


def test_memory_residual_keeps_seven_tensors_and_its_shortcuts():
    p = plan("R2", (2, 2, 2))
    m = p.memory(batch_size=1, optimizer="sgd")
    assert m.activations == 2 * 1 * (8 + 8 + 7 * 8) * 4  # input, rescaled, the block
    projected = plan("R4s2", (4, 4, 2)).memory(batch_size=1, optimizer="sgd")  # output 2x2x4 = 16
    assert projected.activations == 2 * 4 * (32 + 32 + 7 * 16 + 2 * 16)  # + 1x1 conv and BN
    padded = plan("R4s2", (4, 4, 2), shortcut="zero_pad").memory(batch_size=1, optimizer="sgd")
    assert padded.activations == 2 * 4 * (32 + 32 + 7 * 16 + 2 * 2 * 2 + 16)  # + subsampled, zero-padded


def test_memory_counts_an_explicitly_padded_input():
    # 8C4s2p3 is not Keras "same": a ZeroPadding2D keeps a (10 + 6) x (10 + 6) x 1 input
    p = plan("8C4s2p3", (10, 10, 1), preprocessing=None).memory(batch_size=1, optimizer="sgd")
    assert p.activations == 2 * 4 * (100 + 16 * 16 + 2 * (7 * 7 * 8))


def test_memory_counts_preprocessing_given_as_a_list_or_a_tuple():
    import keras

    layers = [keras.layers.Rescaling(0.5), keras.layers.Rescaling(2.0)]
    as_list, as_tuple, none = (plan("FC2", (4, 4, 1), preprocessing=value).memory(batch_size=1, optimizer="sgd")
                               for value in (layers, tuple(layers), None))
    assert as_list.activations == as_tuple.activations == none.activations + 2 * 4 * 2 * 16  # two 4x4 images more


def test_memory_docstring_example():
    assert plan("FC256", (28, 28, 1), 10).memory(batch_size=1, optimizer="sgd").weights == 814_120


@pytest.mark.parametrize("kwargs, needle", [
    (dict(optimizer="lamb"), "optimizer"),
    (dict(precision="float16"), "precision"),
    (dict(precision="bfloat16"), "precision"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-4), "batch_size"),
])
def test_memory_invalid_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        plan("FC4", (2, 2, 1), 2).memory(**kwargs)


def test_plan_table_layout():
    p = plan("8C3-MP2-FC8", (10, 10, 1), 3)
    lines = str(p).splitlines()
    assert lines[0].split() == ["#", "layer", "token", "activation", "output", "params", "MACs", "RF", "note"]
    assert set(lines[1]) == {"-"} and set(lines[-2]) == {"-"}
    assert lines[2].split() == ["input", "10x10x1", "1x1"]
    assert len(lines) == 3 + len(p.rows) + 2
    assert lines[3].split() == ["1", "conv1", "8C3p0", "relu", "8x8x8", "80", "4,608", "3x3"]
    assert lines[-3].split() == ["5", "classifier", "FC3", "softmax", "3", "27", "24", "all"]
    assert math.prod(p.rows[2].output_shape) == 128


def test_numpy_integer_class_count_is_accepted():
    assert plan("8C3", (8, 8, 1), np.int64(10)).num_classes == 10


@pytest.mark.parametrize("shape", [(8.9, 8, 1), (8, 8), (0, 8, 1), (True, 8, 1)])
def test_non_integer_input_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="input_shape must be three positive integers"):
        plan("8C3", shape)


@pytest.mark.parametrize("batch_size", [1.5, True, 0])
def test_memory_batch_size_must_be_a_positive_integer(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        plan("FC10", (8, 8, 1), 10).memory(batch_size=batch_size)


@pytest.mark.parametrize("token", ["MP3s2p1", "AP3s1p1"])
def test_pooling_with_zero_padding_is_refused(token):
    with pytest.raises(SpecError, match="pooling takes p0 or psame"):
        plan(token, (8, 8, 1))


def test_any_activation_moves_after_a_following_bn():
    conv, bn = plan("8C3:softmax-BN", (8, 8, 1)).rows
    assert (conv.layer.activation, conv.use_bias, bn.layer.activation) == ("linear", False, "softmax")


@pytest.mark.parametrize("arch", ["fc256", "mp2-FC8", "r16s2", "d0.5-FC8"])
def test_lowercase_notation_is_notation(arch):
    assert plan(arch, (8, 8, 1), 10).rows[-1].name == "classifier"


@pytest.mark.parametrize("arch, suggestion", [("LeNet5", None), ("resnet-8", "resnet8"), ("lenett", "lenet")])
def test_model_names_ignore_case_and_misspellings_get_suggestions(arch, suggestion):
    if suggestion is None:
        assert plan(arch, (28, 28, 1), 10).params == plan("lenet5", (28, 28, 1), 10).params
    else:
        with pytest.raises(ValueError, match=f"did you mean {suggestion}"):
            plan(arch, (28, 28, 1), 10)
