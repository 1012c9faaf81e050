"""``cnnkit.build``: a functional Keras model from notation or a registered name.

The builder plans first (so a spec that does not fit fails with the CS231n formula before Keras
sees it) and then makes one Keras layer per plan row, named as the row is (``conv1``, ``pool1``,
``fc1``, ``classifier``...). The model takes raw pixels: by default a ``Rescaling(1/255)``
layer is its first layer, so a saved or exported model needs no outside preprocessing.

Example:
    >>> import cnnkit
    >>> model = cnnkit.build("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10)
    >>> model.output_shape, model.count_params()
    ((None, 10), 233196)
"""

from __future__ import annotations

import math

import keras

from cnnkit.models.layers import LocallyConnected2D, LocalResponseNormalization
from cnnkit.models.resnet import residual_block
from cnnkit.planner import plan

_RELU_FAMILY = {"relu", "leaky_relu", "prelu", "elu", "gelu", "swish"}


def build(arch, input_shape, num_classes, **options) -> keras.Model:
    """Build a classifier from notation or a registered name.

    Args:
        arch: notation (``"64C3-64C3-MP2-128C3-128C3-MP2-FC256"``) or a name from
            ``cnnkit.models.list_models()``.
        input_shape: ``(height, width, channels)`` of the raw images.
        num_classes: number of classes; the softmax classifier is appended unless the spec
            already ends with ``FC{num_classes}``.
        **options: build options, defaults in ``cnnkit.planner.DEFAULT_OPTIONS``:
            ``activation`` ("relu"; any of ``cnnkit.spec.ACTIVATIONS``), ``padding`` ("valid"
            or "same", for tokens without ``p``), ``batch_norm`` (BN after every convolution),
            ``initializer`` ("auto": He normal for ReLU-like activations, LeCun normal for SELU,
            Glorot uniform otherwise; "theano" is the Theano tutorial's uniform
            ``sqrt(6 / (fan_in + fan_out / pool_area))``, times 4 for sigmoid units, on every
            layer: the tutorial's logistic-regression output starts at zero instead; or one of
            Keras's "he_normal", "he_uniform", "glorot_uniform", "glorot_normal", "lecun_uniform",
            "lecun_normal": ``cnnkit.planner.INITIALIZERS``),
            ``l2`` (kernel L2 penalty), ``max_norm`` (kernel max-norm constraint),
            ``preprocessing`` ("rescale" for 1/255, ``None`` for none, or a list of Keras
            layers applied first), ``dtype`` (a dtype policy such as "mixed_bfloat16"; the
            softmax output stays float32), ``shortcut`` ("projection": a residual block that
            changes shape projects with a 1x1 convolution + BN; "zero_pad": parameter-free,
            subsampled and zero-padded, He et al.'s option A).

    Returns:
        A functional ``keras.Model`` from raw pixels to class probabilities.

    Raises:
        cnnkit.SpecError: bad notation or a layer that does not fit its input.
        ValueError: an unknown model name or option.

    Example:
        >>> build("lenet", (28, 28, 1), 10).get_layer("conv1").activation.__name__
        'linear'
    """
    model_plan = plan(arch, input_shape, num_classes, **options)
    options = model_plan.options
    dtype = options["dtype"]
    inputs = keras.Input(model_plan.input_shape, name="image")
    x = inputs
    for layer in _preprocessing_layers(options["preprocessing"], dtype):
        x = layer(x)
        if tuple(x.shape[1:]) != model_plan.input_shape:
            raise ValueError(f"preprocessing layer {layer.name!r} ({type(layer).__name__}) changes the image shape "
                             f"{model_plan.input_shape} to {tuple(x.shape[1:])}; the network is planned on the "
                             "input shape, so preprocessing must keep it (resize before build, or pass the "
                             "preprocessed shape as input_shape)")
    rows = model_plan.rows
    for index, row in enumerate(rows):
        input_shape = rows[index - 1].output_shape if index else model_plan.input_shape
        x = _apply_row(x, row, rows[index + 1:], input_shape, options)
    name = arch if arch.isidentifier() else "cnnkit_net"
    return keras.Model(inputs, x, name=name)


def _preprocessing_layers(preprocessing, dtype):
    if preprocessing is None:
        return []
    if preprocessing == "rescale":
        return [keras.layers.Rescaling(1 / 255, name="rescale", dtype=dtype)]
    if isinstance(preprocessing, (list, tuple)) and all(isinstance(layer, keras.layers.Layer) for layer in preprocessing):
        return list(preprocessing)
    raise ValueError(
        f"preprocessing must be 'rescale', None or a list of Keras layers. Received: preprocessing={preprocessing!r}"
    )


def _apply_row(x, row, following, input_shape, options):
    layer, name, dtype = row.layer, row.name, options["dtype"]
    kind = layer.kind
    weights = _weight_options(row, following, input_shape, options)
    if kind in ("conv", "maxpool", "avgpool"):
        padding = layer.padding or 0
        if padding == "same" or (kind == "conv" and layer.stride == (1, 1) and layer.kernel == (2 * padding + 1,) * 2):
            keras_padding = "same"
        else:
            keras_padding = "valid"
            if padding:
                x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad", dtype=dtype)(x)
        if kind == "conv":
            x = keras.layers.Conv2D(layer.size, layer.kernel, strides=layer.stride, padding=keras_padding,
                                    use_bias=row.use_bias, name=name, **weights)(x)
        else:
            pool = keras.layers.MaxPooling2D if kind == "maxpool" else keras.layers.AveragePooling2D
            x = pool(layer.kernel, strides=layer.stride, padding=keras_padding, name=name, dtype=dtype)(x)
    elif kind == "local":
        x = LocallyConnected2D(layer.size, layer.kernel, strides=layer.stride, use_bias=row.use_bias, name=name,
                               **weights)(x)
    elif kind == "residual":
        return residual_block(x, layer.size, stride=layer.stride, name=name, shortcut=options["shortcut"],
                              activation=_block_activation(layer.activation, name, dtype), **weights)
    elif kind == "dense":
        x = keras.layers.Dense(layer.size, use_bias=row.use_bias, name=name, **weights)(x)
    elif kind == "flatten":
        x = keras.layers.Flatten(name=name, dtype=dtype)(x)
    elif kind == "gap":
        x = keras.layers.GlobalAveragePooling2D(name=name, dtype=dtype)(x)
    elif kind == "gmp":
        x = keras.layers.GlobalMaxPooling2D(name=name, dtype=dtype)(x)
    elif kind == "dropout":
        x = keras.layers.Dropout(layer.rate, name=name, dtype=dtype)(x)
    elif kind == "bn":
        x = keras.layers.BatchNormalization(name=name, dtype=dtype)(x)
    elif kind == "lrn":
        x = LocalResponseNormalization(size=layer.size, name=name, dtype=dtype)(x)
    if name == "classifier":
        return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return _activation(x, layer.activation, f"{name}_act", dtype)


def _activation(x, activation, name, dtype):
    if activation in (None, "linear"):
        return x
    if activation == "prelu":
        shared_axes = [1, 2] if len(x.shape) == 4 else None
        return keras.layers.PReLU(shared_axes=shared_axes, name=name, dtype=dtype)(x)
    return keras.layers.Activation(activation, name=name, dtype=dtype)(x)


def _block_activation(activation, block_name, dtype):
    """The activation callable of a residual block; the block's output layer is always ``block_name``."""

    def apply(tensor, layer_name):
        if activation == "linear" and layer_name == block_name:
            return keras.layers.Identity(name=layer_name, dtype=dtype)(tensor)
        return _activation(tensor, activation, layer_name, dtype)

    return apply


def _weight_options(row, following, input_shape, options):
    """Initialiser, regulariser, constraint and dtype for a layer with weights."""
    layer = row.layer
    result = {"dtype": options["dtype"]}
    if layer.kind not in ("conv", "local", "dense", "residual"):
        return result
    activation = layer.activation
    if activation == "linear" and following and following[0].layer.kind == "bn":
        activation = following[0].layer.activation  # the activation moved after BN
    result["kernel_initializer"] = _initializer(options["initializer"], activation, row, following, input_shape)
    if options["l2"]:
        result["kernel_regularizer"] = keras.regularizers.L2(options["l2"])
    if options["max_norm"]:
        axis = {"dense": 0, "local": 1}.get(layer.kind, [0, 1, 2])
        result["kernel_constraint"] = keras.constraints.MaxNorm(options["max_norm"], axis=axis)
    return result


def _initializer(initializer, activation, row, following, input_shape):
    if initializer == "auto":
        if activation == "selu":
            return "lecun_normal"
        return "he_normal" if activation in _RELU_FAMILY else "glorot_uniform"
    if initializer != "theano":
        return initializer
    # deeplearning.net LeNetConvPoolLayer / HiddenLayer: U(+-sqrt(6 / (fan_in + fan_out / pool_area)))
    kernel_area = {"dense": 1, "residual": 9}.get(row.layer.kind) or math.prod(row.layer.kernel)
    fan_in = kernel_area * input_shape[-1]
    fan_out = kernel_area * row.output_shape[-1]
    after_norm = [later for later in following[:2] if later.layer.kind != "bn"]  # look past a BN
    if after_norm and after_norm[0].layer.kind in ("maxpool", "avgpool"):
        fan_out /= math.prod(after_norm[0].layer.kernel)
    limit = math.sqrt(6.0 / (fan_in + fan_out)) * (4 if activation == "sigmoid" else 1)  # HiddenLayer's x4
    return keras.initializers.RandomUniform(-limit, limit)
