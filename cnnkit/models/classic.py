"""The classic networks of the seed papers, each as notation plus the options it needs.

Example:
    >>> import cnnkit
    >>> cnnkit.plan("network3", (28, 28, 1), 10).params
    1672570
"""

from cnnkit.models.registry import Architecture, register_model


def _mlp(*hidden_units, reference):
    return Architecture("-".join(f"FC{units}" for units in hidden_units), reference=reference)


@register_model
def mlp_64():
    """One hidden layer of 64 ReLU units (the MNIST table's FC64 baseline)."""
    return _mlp(64, reference="MLP baseline, one hidden layer of 64 units")


@register_model
def mlp_256x2():
    """Two hidden layers of 256 ReLU units (the MNIST table's FC256-FC256 baseline)."""
    return _mlp(256, 256, reference="MLP baseline, two hidden layers of 256 units")


@register_model
def lenet5():
    """LeNet-5 (LeCun et al. 1998): C1-S2-C3-S4-C5-F6 with tanh and average-pool subsampling.

    The 28x28 MNIST image is zero-padded by 2 to the paper's 32x32 field. Full C3 connectivity
    replaces the paper's partial table, S2 and S4 are plain averages (the paper's have a trainable
    coefficient and bias per map, then a squashing function), and softmax replaces its RBF output
    layer.
    """
    return Architecture(
        "6C5p2-AP2-16C5-AP2-120C5-FC84",
        {"activation": "tanh", "initializer": "lecun_uniform"},
        reference="LeCun et al. 1998, Gradient-based learning applied to document recognition",
    )


@register_model
def lenet():
    """LeNet of the deeplearning.net Theano tutorial: 20C5-MP2-50C5-MP2-FC500, tanh, Theano init."""
    return Architecture(
        "20C5-MP2-50C5-MP2-FC500",
        {"activation": "tanh", "initializer": "theano"},
        reference="LeNet of the deeplearning.net Theano tutorial",
    )


@register_model
def network3():
    """Nielsen's final network3: two 5x5 conv-pool layers, ReLU, two FC1000 with dropout 0.5.

    network3 drops the *inputs* of its fully connected and softmax layers, hence each ``D0.5``
    stands before the layer it belongs to.
    """
    return Architecture(
        "20C5-MP2-40C5-MP2-D0.5-FC1000-D0.5-FC1000-D0.5",
        reference="Nielsen, Neural Networks and Deep Learning, ch. 6 (network3.py)",
    )


@register_model
def vgg_small():
    """VGG-style 64C3-64C3-MP2-128C3-128C3-MP2-FC256 with 'same' 3x3 convolutions.

    ``batch_norm=True`` puts batch normalisation after every convolution.
    """
    return Architecture(
        "64C3-64C3-MP2-128C3-128C3-MP2-FC256",
        {"padding": "same"},
        reference="Simonyan and Zisserman 2015 (VGG), small variant",
    )


@register_model
def alexnet():
    """AlexNet (Krizhevsky et al. 2012) on 227x227x3: LRN, overlapping 3x3/2 pooling, dropout.

    A departure from the paper: conv2, conv4 and conv5 are not split into its two GPU groups
    (each filter there sees all of the previous layer's channels, not half), so the network
    has 62.4M parameters against the paper's ~60M.
    """
    return Architecture(
        "96C11s4p0-LRN-MP3s2-256C5p2-LRN-MP3s2-384C3p1-384C3p1-256C3p1-MP3s2-FC4096-D0.5-FC4096-D0.5",
        reference="Krizhevsky, Sutskever and Hinton 2012, ImageNet classification with deep CNNs",
    )


@register_model
def alexnet_small():
    """AlexNet's design (LRN, overlapping pooling, dropout) scaled for 28-64 px inputs."""
    return Architecture(
        "64C5p2-LRN-MP3s2-128C5p2-LRN-MP3s2-192C3p1-192C3p1-128C3p1-MP3s2-FC512-D0.5-FC512-D0.5",
        reference="Krizhevsky et al. 2012, scaled down for 28-64 px inputs",
    )
