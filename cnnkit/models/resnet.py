"""Small residual networks (He et al. 2016) for 28-64 px inputs, and the residual block.

In the notation a basic block is ``R{filters}`` (``R32s2`` to downsample). The CIFAR ResNets of
the paper are ``16C3p1-BN`` then three stages of n blocks of 16, 32, 64 filters, then ``GAP``:
depth 6n + 2, with the paper's parameter-free shortcuts (option A, build option
``shortcut="zero_pad"``). A block in notation projects by default (option B).

Example:
    >>> from cnnkit.models.registry import get_architecture
    >>> get_architecture("resnet8").spec
    '16C3p1-BN-R16-R32s2-R64s2-GAP'
"""

from cnnkit.models.registry import Architecture, register_model


def residual_block(x, filters, *, stride, activation, name, shortcut="projection", **conv_options):
    """Basic block: 3x3 conv-BN-act, 3x3 conv-BN, add the shortcut, act.

    The shortcut is the identity while the shape stays. When the stride or the width changes it
    is a 1x1 convolution + BN (``shortcut="projection"``, the paper's option B, layer
    ``{name}_proj``), or with ``shortcut="zero_pad"`` (option A, no parameters) the input
    subsampled by the stride (``{name}_subsample``, a 1x1 max-pooling) with zero channels
    appended up to ``filters`` (``{name}_zero_pad``); a block that narrows projects either way.
    The block's output layer is named ``name``.

    Args:
        x: input tensor (batch, height, width, channels).
        filters: output channels.
        stride: stride (an int or a (height, width) pair) of the first convolution and the shortcut.
        activation: a callable ``(tensor, layer_name) -> tensor`` applying the activation.
        name: layer-name prefix; the output layer is called exactly ``name``.
        shortcut: "projection" or "zero_pad", for a block that changes shape.
        **conv_options: passed to every ``Conv2D`` (initialiser, regulariser, dtype); an
            initialiser object is copied for each, as an unseeded Keras initialiser gives the
            same values at every call (the two 3x3 kernels would start equal).

    Example:
        >>> import keras
        >>> inputs = keras.Input((28, 28, 16))
        >>> act = lambda t, n: keras.layers.Activation("relu", name=n)(t)
        >>> residual_block(inputs, 32, stride=2, activation=act, name="res1").shape
        (None, 14, 14, 32)
    """
    import keras  # here, so that planning and listing models never load TensorFlow

    dtype = conv_options.get("dtype")
    def own(options):
        initializer = options.get("kernel_initializer")
        if isinstance(initializer, keras.initializers.Initializer):
            return {**options, "kernel_initializer": initializer.__class__.from_config(initializer.get_config())}
        return options

    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_conv1", **own(conv_options))(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1", dtype=dtype)(y)
    y = activation(y, f"{name}_act1")
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2", **own(conv_options))(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2", dtype=dtype)(y)
    strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
    channels = x.shape[-1]
    if shortcut == "zero_pad" and filters >= channels:
        if strides != (1, 1):  # ceil(size / stride), as the "same" convolution above
            x = keras.layers.MaxPooling2D(1, strides=strides, name=f"{name}_subsample", dtype=dtype)(x)
        if filters > channels:
            # channels_first makes ZeroPadding2D pad the last two axes, here (width, channels):
            # zero channels appended, with stock, serializable Keras layers only.
            x = keras.layers.ZeroPadding2D(((0, 0), (0, filters - channels)), data_format="channels_first",
                                           name=f"{name}_zero_pad", dtype=dtype)(x)
        residual = x
    elif strides != (1, 1) or channels != filters:
        residual = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False, name=f"{name}_proj",
                                       **own(conv_options))(x)
        residual = keras.layers.BatchNormalization(name=f"{name}_proj_bn", dtype=dtype)(residual)
    else:
        residual = x
    y = keras.layers.Add(name=f"{name}_add", dtype=dtype)([y, residual])
    return activation(y, name)


def _cifar_resnet(blocks_per_stage):
    tokens = ["16C3p1", "BN"]
    for stage, width in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            tokens.append(f"R{width}s2" if stage > 0 and block == 0 else f"R{width}")
    depth = 6 * blocks_per_stage + 2
    return Architecture(
        "-".join(tokens + ["GAP"]),
        {"initializer": "he_normal", "shortcut": "zero_pad"},
        reference=f"He et al. 2016, Deep residual learning, CIFAR ResNet-{depth}",
    )


@register_model
def resnet8():
    """ResNet-8: one basic block per stage (16, 32, 64 filters), zero-padded shortcuts (option A)."""
    return _cifar_resnet(1)


@register_model
def resnet20():
    """ResNet-20: three basic blocks per stage, as in the paper's CIFAR-10 table.

    Option A shortcuts as in the paper's CIFAR experiments: 269,722 trainable parameters on
    32x32x3 with 10 classes (the paper's 0.27M).
    """
    return _cifar_resnet(3)
