"""Pretrained ``keras.applications`` backbones and the metadata that fine-tuning needs.

A backbone is data beside its builder (as timm's ``PretrainedCfg``, fastai's ``model_meta`` with
``cut`` and ``split``): the ``keras.applications`` constructor, the default and smallest input
size, the preprocessing the ImageNet weights expect, where the classifier head is cut, and the
layer groups that staged fine-tuning unfreezes from the top down.

``build_backbone`` makes the feature extractor (``include_top=False``, no pooling) with
``weights="imagenet"`` (Keras's own download and cache), ``None`` (untrained) or a local weights
file (offline). ``preprocessing_layers`` maps raw pixels of any size, grayscale or RGB, to what
the backbone expects, with serializable layers, so a model built on them takes raw pixels and
keeps its preprocessing when saved and exported. ``layer_groups`` splits a built backbone into
its groups, for freezing and unfreezing by stage.

Example:
    >>> from cnnkit.models.backbones import get_backbone, list_backbones
    >>> "mobilenet_v2" in list_backbones()
    True
    >>> backbone = get_backbone("MobileNetV2")
    >>> backbone.input_size, backbone.preprocessing
    ((224, 224), 'tf')
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
import os
import re
from pathlib import Path

import keras
from keras import ops

from cnnkit.downloads import keras_download

__all__ = [
    "Backbone",
    "GrayscaleToRGB",
    "ImageNetPreprocessing",
    "build_backbone",
    "get_backbone",
    "layer_groups",
    "list_backbones",
    "preprocessing_layers",
]

PREPROCESSING_MODES = ("tf", "caffe", "torch", "none")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_WEIGHTS_SUFFIXES = (".h5", ".hdf5")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` network with its fine-tuning metadata.

    Attributes:
        name: Registered name, lower snake case (``"mobilenet_v2"``). Lookups ignore case,
            ``_`` and ``-``, so the Keras class name (``"MobileNetV2"``) finds it too.
        constructor: Dotted path of the ``keras.applications`` function that builds it.
        input_size: ``(height, width)`` of the ImageNet weights: images are resized to it.
        min_input_size: ``(height, width)``: the smallest input the Keras constructor accepts.
        preprocessing: What the weights expect of raw 0..255 RGB pixels, as the family's
            ``keras.applications.<family>.preprocess_input`` does it: ``"tf"`` (``x / 127.5 - 1``),
            ``"caffe"`` (RGB to BGR, minus the ImageNet mean pixel), ``"torch"`` (``x / 255``,
            then the ImageNet mean and standard deviation) or ``"none"`` (the network rescales
            inside, as EfficientNet, EfficientNetV2, MobileNetV3 and ConvNeXt do in Keras 3).
        groups: ``(group name, regular expression)`` pairs, from input to output. A layer
            belongs to the group whose expression matches the start of its name
            (``re.match``); a layer no expression matches (Keras names some layers
            automatically: ``conv2d_7``, ``add_3``) belongs to the group of the next layer
            that one matches, in the model's topological order, since a block's unnamed layers
            come before its named output; layers after the last match join the last group.
        feature_layer: Name of the layer whose output is the feature map, or ``None`` for the
            output of the ``include_top=False`` network.
        reference: The paper.
        normalization_rescale: EfficientNet (V1) only. Keras puts ``Rescaling(these)`` after
            the network's ``Normalization`` layer when ``weights="imagenet"`` and not otherwise
            (tensorflow/tensorflow#49930); ``build_backbone`` adds it for ``None`` and weights
            files too, so all three build the same network and an offline copy of the ImageNet
            weights computes what the download does.

    Example:
        >>> backbone = get_backbone("resnet50")
        >>> backbone.constructor, backbone.preprocessing
        ('keras.applications.ResNet50', 'caffe')
        >>> [name for name, _ in backbone.groups]
        ['stem', 'stage_2', 'stage_3', 'stage_4', 'stage_5']
    """

    name: str
    constructor: str
    input_size: tuple[int, int]
    min_input_size: tuple[int, int]
    preprocessing: str
    groups: tuple[tuple[str, str], ...]
    feature_layer: str | None = None
    reference: str = ""
    normalization_rescale: tuple[float, ...] | None = None


# --------------------------------------------------------------------------- the table

_MOBILENET_V2_GROUPS = (
    ("stem", r"Conv1|bn_Conv1|expanded_conv_"),
    ("blocks_1_2", r"block_[12]_"),
    ("blocks_3_5", r"block_[3-5]_"),
    ("blocks_6_12", r"block_([6-9]|1[0-2])_"),
    ("blocks_13_16", r"block_1[3-6]_"),
    ("top", r"Conv_1|out_relu"),
)
# Block 0 of MobileNetV3 is "expanded_conv_<op>", block k is "expanded_conv_<k>_<op>".
_MOBILENET_V3_SMALL_GROUPS = (
    ("stem", r"conv(_bn)?$|expanded_conv_[a-z]"),
    ("blocks_1_2", r"expanded_conv_[12]_"),
    ("blocks_3_7", r"expanded_conv_[3-7]_"),
    ("blocks_8_10", r"expanded_conv_([89]|10)_"),
    ("top", r"conv_1(_bn)?$"),
)
_MOBILENET_V3_LARGE_GROUPS = (
    ("stem", r"conv(_bn)?$|expanded_conv_[a-z]"),
    ("blocks_1_2", r"expanded_conv_[12]_"),
    ("blocks_3_5", r"expanded_conv_[3-5]_"),
    ("blocks_6_11", r"expanded_conv_([6-9]|1[01])_"),
    ("blocks_12_14", r"expanded_conv_1[2-4]_"),
    ("top", r"conv_1(_bn)?$"),
)
_EFFICIENTNET_GROUPS = (
    ("stem", r"stem_"),
    ("blocks_1_2", r"block[12][a-z]_"),
    ("blocks_3", r"block3[a-z]_"),
    ("blocks_4_5", r"block[45][a-z]_"),
    ("blocks_6_7", r"block[67][a-z]_"),
    ("top", r"top_"),
)
_EFFICIENTNET_V2_GROUPS = (
    ("stem", r"stem_"),
    ("blocks_1_3", r"block[1-3][a-z]_"),
    ("blocks_4", r"block4[a-z]_"),
    ("blocks_5", r"block5[a-z]_"),
    ("blocks_6", r"block6[a-z]_"),
    ("top", r"top_"),
)
_RESNET_GROUPS = (
    ("stem", r"conv1_|pool1_"),
    ("stage_2", r"conv2_"),
    ("stage_3", r"conv3_"),
    ("stage_4", r"conv4_"),
    ("stage_5", r"conv5_|post_"),
)
# A transition (BN, 1x1 convolution, pooling) ends each dense stage, as in torchvision.
_DENSENET_GROUPS = (
    ("stem", r"conv1_|pool1"),
    ("dense_2", r"conv2_|pool2_"),
    ("dense_3", r"conv3_|pool3_"),
    ("dense_4", r"conv4_|pool4_"),
    ("dense_5", r"conv5_|bn$|relu$"),
)
# A stage starts with the downsampling that enters it, as in timm.
_CONVNEXT_TINY_GROUPS = (
    ("stem", r"convnext_tiny_(prestem|stem)"),
    ("stage_0", r"convnext_tiny_stage_0_"),
    ("stage_1", r"convnext_tiny_(downsampling_block_0|stage_1_)"),
    ("stage_2", r"convnext_tiny_(downsampling_block_1|stage_2_)"),
    ("stage_3", r"convnext_tiny_(downsampling_block_2|stage_3_)"),
)
_VGG_GROUPS = tuple((f"block{i}", rf"block{i}_") for i in range(1, 6))
# The unnamed 1x1 shortcut of blocks 2-4 and 13 comes after the block's named layers and
# before the next block's: groups end after blocks without one (1, 5, 9, 12).
_XCEPTION_GROUPS = (
    ("stem", r"block1_"),
    ("blocks_2_5", r"block[2-5]_"),
    ("blocks_6_9", r"block[6-9]_"),
    ("blocks_10_12", r"block1[0-2]_"),
    ("blocks_13_14", r"block1[34]_"),
)
# Only the concatenations that end the Inception modules have names ("mixed0" ... "mixed10");
# the stem, unnamed, joins the first group.
_INCEPTION_V3_GROUPS = (
    ("mixed_0_2", r"mixed[0-2]$"),
    ("mixed_3_5", r"mixed[3-5]$"),
    ("mixed_6_7", r"mixed[67]$"),
    ("mixed_8_10", r"mixed(8|9|10)"),
)

_EFFICIENTNET = "Tan & Le 2019, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"
_MOBILENET_V3 = "Howard et al. 2019, Searching for MobileNetV3"
_EFFICIENTNET_RESCALE = tuple(1.0 / math.sqrt(std) for std in _TORCH_STD)


def _efficientnet(variant: str, size: int) -> Backbone:
    return Backbone(f"efficientnet_{variant.lower()}", f"keras.applications.EfficientNet{variant}", (size, size), (32, 32),
                    "none", _EFFICIENTNET_GROUPS, reference=_EFFICIENTNET,
                    normalization_rescale=_EFFICIENTNET_RESCALE)


_BACKBONES = (
    Backbone("mobilenet_v2", "keras.applications.MobileNetV2", (224, 224), (32, 32), "tf", _MOBILENET_V2_GROUPS,
             reference="Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks"),
    Backbone("mobilenet_v3_small", "keras.applications.MobileNetV3Small", (224, 224), (32, 32), "none",
             _MOBILENET_V3_SMALL_GROUPS, reference=_MOBILENET_V3),
    Backbone("mobilenet_v3_large", "keras.applications.MobileNetV3Large", (224, 224), (32, 32), "none",
             _MOBILENET_V3_LARGE_GROUPS, reference=_MOBILENET_V3),
    _efficientnet("B0", 224),
    _efficientnet("B1", 240),
    _efficientnet("B2", 260),
    _efficientnet("B3", 300),
    Backbone("efficientnet_v2_b0", "keras.applications.EfficientNetV2B0", (224, 224), (32, 32), "none",
             _EFFICIENTNET_V2_GROUPS, reference="Tan & Le 2021, EfficientNetV2: Smaller Models and Faster Training"),
    Backbone("resnet50", "keras.applications.ResNet50", (224, 224), (32, 32), "caffe", _RESNET_GROUPS,
             reference="He et al. 2016, Deep Residual Learning for Image Recognition"),
    Backbone("resnet50_v2", "keras.applications.ResNet50V2", (224, 224), (32, 32), "tf", _RESNET_GROUPS,
             reference="He et al. 2016, Identity Mappings in Deep Residual Networks"),
    Backbone("densenet121", "keras.applications.DenseNet121", (224, 224), (32, 32), "torch", _DENSENET_GROUPS,
             reference="Huang et al. 2017, Densely Connected Convolutional Networks"),
    Backbone("convnext_tiny", "keras.applications.ConvNeXtTiny", (224, 224), (32, 32), "none", _CONVNEXT_TINY_GROUPS,
             reference="Liu et al. 2022, A ConvNet for the 2020s"),
    Backbone("vgg16", "keras.applications.VGG16", (224, 224), (32, 32), "caffe", _VGG_GROUPS,
             reference="Simonyan & Zisserman 2015, Very Deep Convolutional Networks for Large-Scale Image Recognition"),
    Backbone("xception", "keras.applications.Xception", (299, 299), (71, 71), "tf", _XCEPTION_GROUPS,
             reference="Chollet 2017, Xception: Deep Learning with Depthwise Separable Convolutions"),
    Backbone("inception_v3", "keras.applications.InceptionV3", (299, 299), (75, 75), "tf", _INCEPTION_V3_GROUPS,
             reference="Szegedy et al. 2016, Rethinking the Inception Architecture for Computer Vision"),
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_REGISTRY = {_key(backbone.name): backbone for backbone in _BACKBONES}


# --------------------------------------------------------------------------- lookup


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted.

    Example:
        >>> list_backbones()[:3]
        ['convnext_tiny', 'densenet121', 'efficientnet_b0']
    """
    return sorted(backbone.name for backbone in _BACKBONES)


def get_backbone(name: str | Backbone) -> Backbone:
    """The :class:`Backbone` registered as ``name``; a :class:`Backbone` is returned as is.

    Case, ``_`` and ``-`` are ignored, so the ``keras.applications`` class name works too.

    Args:
        name: A registered name (``"efficientnet_b0"``, ``"EfficientNetB0"``) or a
            :class:`Backbone` of your own.

    Raises:
        ValueError: An unknown name (the message lists close matches and all names).

    Example:
        >>> get_backbone("EfficientNetV2B0").name
        'efficientnet_v2_b0'
    """
    if isinstance(name, Backbone):
        return name
    if not isinstance(name, str):
        raise ValueError(f"A backbone is a registered name or a Backbone. Received: name={name!r}")
    backbone = _REGISTRY.get(_key(name))
    if backbone is None:
        names = list_backbones()
        by_key = {_key(known): known for known in names}
        close = difflib.get_close_matches(_key(name), by_key, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(by_key[key] for key in close)}? " if close else ""
        raise ValueError(f"Unknown backbone {name!r}; {hint}registered: {', '.join(names)}. Received: name={name!r}")
    return backbone


# --------------------------------------------------------------------------- building


def build_backbone(name: str | Backbone, *, input_shape=None, weights="imagenet") -> keras.Model:
    """The backbone as a feature extractor: ``include_top=False``, no pooling.

    Args:
        name: A registered name or a :class:`Backbone`.
        input_shape: ``(height, width, 3)``; ``None`` means the backbone's ``input_size``.
            Height and width may be ``None`` (any size) or at least ``min_input_size``.
            Grayscale and other sizes go through :func:`preprocessing_layers` first.
        weights: ``"imagenet"``: Keras downloads the weights once into its cache
            (``~/.keras/models``) and loads them from there. ``None``: untrained. A path to a
            weights file (``~`` is the home directory), for machines without internet: a
            ``.weights.h5`` file written by ``save_weights`` of a backbone built here (at any
            input size), or the ``*_notop.h5`` file that ``weights="imagenet"`` downloads into
            Keras's cache.
            A ``.keras`` file is a whole model, not weights: load it with
            ``keras.saving.load_model`` (``cnnkit.recipes.finetune`` accepts one).

    Returns:
        A functional ``keras.Model`` from images, as :func:`preprocessing_layers` leaves
        them, to the feature map (``feature_layer``'s output when the backbone names one).

    Raises:
        ValueError: An unknown name, a bad ``input_shape``, a ``weights`` value that is none
            of the above, or a weights file that does not fit the architecture.
        FileNotFoundError: A weights path that does not exist.

    Example:
        >>> model = build_backbone("mobilenet_v2", input_shape=(96, 96, 3), weights=None)
        >>> tuple(model.output.shape)
        (None, 3, 3, 1280)
    """
    backbone = get_backbone(name)
    shape = _check_input_shape(backbone, input_shape)
    path = None if weights in ("imagenet", None) else _check_weights_path(weights)
    module_name, _, function_name = backbone.constructor.rpartition(".")
    constructor = getattr(importlib.import_module(module_name), function_name)
    if weights == "imagenet":
        with keras_download(f"the ImageNet weights of {backbone.name}",
                            "weights=PATH to a copy of Keras's *_notop.h5 file, or weights=None (untrained)"):
            model = constructor(include_top=False, weights="imagenet", input_shape=shape)
    else:
        model = constructor(include_top=False, weights=None, input_shape=shape)
        if backbone.normalization_rescale:
            model = _rescale_after_normalization(model, backbone.normalization_rescale)
        if path is not None:
            _load_weights(model, path, backbone)
    if backbone.feature_layer:
        model = keras.Model(model.inputs, model.get_layer(backbone.feature_layer).output, name=model.name)
    return model


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_input_shape(backbone: Backbone, input_shape) -> tuple:
    if input_shape is None:
        return (*backbone.input_size, 3)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    least = backbone.min_input_size
    if not (len(shape) == 3 and shape[2] == 3
            and all(side is None or (_is_int(side) and side >= low) for side, low in zip(shape[:2], least))):
        raise ValueError(
            f"Backbone {backbone.name!r} takes (height, width, 3) images of at least {least[0]}x{least[1]} pixels "
            "(None for any size); preprocessing_layers() converts grayscale and resizes. "
            f"Received: input_shape={input_shape!r}"
        )
    return shape


def _check_weights_path(weights) -> Path:
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be 'imagenet', None or a path to a weights file. Received: weights={weights!r}")
    path = Path(weights).expanduser()
    if path.suffix == ".keras":
        raise ValueError(
            "A .keras file is a whole model, not backbone weights: load it with keras.saving.load_model "
            "(cnnkit.recipes.finetune accepts one), or write the backbone's weights with "
            "backbone.save_weights('backbone.weights.h5'). "
            f"Received: weights={str(weights)!r}"
        )
    if path.suffix not in _WEIGHTS_SUFFIXES:
        raise ValueError(
            "weights must be 'imagenet', None or a path to a .weights.h5 / .h5 weights file. "
            f"Received: weights={str(weights)!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {str(path)!r}. Received: weights={str(weights)!r}")
    return path


def _load_weights(model: keras.Model, path: Path, backbone: Backbone) -> None:
    try:
        model.load_weights(path)
    except (ValueError, KeyError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Could not load weights file {str(path)!r} into backbone {backbone.name!r} "
            f"({backbone.constructor}, include_top=False): {reason}. Received: weights={str(path)!r}"
        ) from error


def _rescale_after_normalization(model: keras.Model, scale: tuple[float, ...]) -> keras.Model:
    """A copy of ``model`` (new layers: a layer in two graphs has an ambiguous ``output``) with
    ``Rescaling(scale)`` after its Normalization layer."""

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            return keras.layers.Rescaling(list(scale), name=f"{layer.name}_rescaling")(outputs)
        return outputs

    inputs = keras.Input(batch_shape=model.inputs[0].shape, name=model.layers[0].name)
    return keras.models.clone_model(model, input_tensors=inputs, call_function=call)


# --------------------------------------------------------------------------- layer groups


def layer_groups(model: keras.Model, backbone: str | Backbone) -> dict[str, list[keras.layers.Layer]]:
    """Every layer of a built backbone in exactly one of the backbone's groups, in order.

    Unfreezing the last ``k`` groups trains the top of the network and keeps the rest frozen.
    The rule that puts a layer in a group is described under :attr:`Backbone.groups`; a model
    cut early (``feature_layer``) leaves the later groups empty.

    Args:
        model: A model from :func:`build_backbone` for this backbone.
        backbone: A registered name or a :class:`Backbone`.

    Returns:
        ``{group name: [layers]}`` in the order of ``backbone.groups``; joined, the lists are
        ``model.layers`` in order.

    Raises:
        ValueError: No layer matches any group (the model is another network), a layer
            matches several groups, or the groups' layers come out of order; the message
            names the layer.

    Example:
        >>> model = build_backbone("vgg16", input_shape=(32, 32, 3), weights=None)
        >>> groups = layer_groups(model, "vgg16")
        >>> [layer.name for layer in groups["block5"]]
        ['block5_conv1', 'block5_conv2', 'block5_conv3', 'block5_pool']
    """
    backbone = get_backbone(backbone)
    names = [group for group, _ in backbone.groups]
    patterns = [re.compile(pattern) for _, pattern in backbone.groups]
    matched = []
    for layer in model.layers:
        hits = [index for index, pattern in enumerate(patterns) if pattern.match(layer.name)]
        if len(hits) > 1:
            raise ValueError(f"Layer {layer.name!r} matches several groups of backbone {backbone.name!r}: "
                             f"{', '.join(names[index] for index in hits)}. Received: model={model.name!r}")
        if hits and matched and hits[0] < matched[-1][1]:
            raise ValueError(f"Layer {layer.name!r} (group {names[hits[0]]!r}) comes after layers of a later group "
                             f"of backbone {backbone.name!r}; groups must follow the model's layer order. "
                             f"Received: model={model.name!r}")
        if hits:
            matched.append((layer, hits[0]))
    if not matched:
        raise ValueError(f"No layer of model {model.name!r} matches a group of backbone {backbone.name!r}; "
                         f"build it with build_backbone({backbone.name!r}). Received: model={model.name!r}")
    owner = {id(layer): index for layer, index in matched}
    groups = {name: [] for name in names}
    current = matched[-1][1]
    for layer in reversed(model.layers):  # an unmatched layer joins the next matched one's group
        current = owner.get(id(layer), current)
        groups[names[current]].append(layer)
    return {name: members[::-1] for name, members in groups.items()}


# --------------------------------------------------------------------------- preprocessing


@keras.saving.register_keras_serializable(package="cnnkit")
class ImageNetPreprocessing(keras.layers.Layer):
    """A backbone's input preprocessing as a layer: raw 0..255 RGB pixels in.

    Computes what ``keras.applications.<family>.preprocess_input`` computes for the mode, so
    a model that starts with this layer takes raw pixels, and keeps doing so when saved or
    exported.

    Args:
        mode: ``"tf"`` (``x / 127.5 - 1``), ``"caffe"`` (RGB to BGR, then minus the ImageNet
            mean pixel ``(103.939, 116.779, 123.68)``), ``"torch"`` (``x / 255``, minus the
            ImageNet mean ``(0.485, 0.456, 0.406)``, divided by the standard deviation
            ``(0.229, 0.224, 0.225)``) or ``"none"`` (unchanged: the network rescales inside).
        **kwargs: Standard ``keras.layers.Layer`` keyword arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: An unknown mode, or ``"caffe"``/``"torch"`` on an input without 3 channels.

    Example:
        >>> import numpy as np
        >>> layer = ImageNetPreprocessing("tf")
        >>> np.asarray(layer(np.array([[[[0.0, 127.5, 255.0]]]], "float32"))).tolist()
        [[[[-1.0, 0.0, 1.0]]]]
    """

    def __init__(self, mode="tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {', '.join(PREPROCESSING_MODES)}. Received: mode={mode!r}")
        self.mode = mode

    def build(self, input_shape):
        if self.mode in ("caffe", "torch") and input_shape[-1] != 3:
            raise ValueError(f"ImageNetPreprocessing(mode={self.mode!r}) needs RGB input (3 channels). "
                             f"Received: input_shape={tuple(input_shape)}")
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config


@keras.saving.register_keras_serializable(package="cnnkit")
class GrayscaleToRGB(keras.layers.Layer):
    """Repeats a one-channel image into three identical channels, for RGB backbones.

    Example:
        >>> import numpy as np
        >>> tuple(GrayscaleToRGB()(np.zeros((2, 28, 28, 1), "float32")).shape)
        (2, 28, 28, 3)
    """

    def build(self, input_shape):
        if input_shape[-1] != 1:
            raise ValueError(f"GrayscaleToRGB needs one input channel. Received: input_shape={tuple(input_shape)}")
        self.built = True

    def call(self, inputs):
        return ops.repeat(ops.cast(inputs, self.compute_dtype), 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


def preprocessing_layers(backbone: str | Backbone, *, image_shape, input_size=None) -> list[keras.layers.Layer]:
    """Layers that turn raw pixels into what the backbone expects.

    In order: ``keras.layers.Resizing`` to the backbone's size (bilinear, antialiased when
    shrinking) unless the images already have it, :class:`GrayscaleToRGB` for one-channel
    images, and :class:`ImageNetPreprocessing` with the backbone's mode. All are serializable,
    so a saved or exported model keeps taking raw pixels.

    Args:
        backbone: A registered name or a :class:`Backbone`.
        image_shape: ``(height, width, channels)`` of the raw images, float 0..255;
            ``channels`` is 1 or 3, height and width may be ``None`` (varying sizes).
        input_size: ``(height, width)`` to resize to; ``None`` means ``backbone.input_size``.
            At least ``backbone.min_input_size`` each; build the backbone at the same size.

    Returns:
        A list of Keras layers to apply in order.

    Raises:
        ValueError: A bad ``image_shape`` or ``input_size``, naming it.

    Example:
        >>> [type(layer).__name__ for layer in preprocessing_layers("mobilenet_v2", image_shape=(28, 28, 1))]
        ['Resizing', 'GrayscaleToRGB', 'ImageNetPreprocessing']
    """
    backbone = get_backbone(backbone)
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else ()
    if not (len(shape) == 3 and shape[2] in (1, 3) and all(side is None or (_is_int(side) and side > 0)
                                                           for side in shape[:2])):
        raise ValueError("image_shape must be (height, width, channels) with 1 or 3 channels and positive "
                         f"(or None) height and width. Received: image_shape={image_shape!r}")
    size = backbone.input_size if input_size is None else tuple(input_size) if isinstance(input_size, (tuple, list)) else ()
    least = backbone.min_input_size
    if not (len(size) == 2 and all(_is_int(side) and side >= low for side, low in zip(size, least))):
        raise ValueError(f"input_size must be (height, width) of at least {least[0]}x{least[1]} for backbone "
                         f"{backbone.name!r}. Received: input_size={input_size!r}")
    layers = []
    if shape[:2] != size:
        layers.append(keras.layers.Resizing(*size, interpolation="bilinear", antialias=True, name="resize"))
    if shape[2] == 1:
        layers.append(GrayscaleToRGB(name="grayscale_to_rgb"))
    layers.append(ImageNetPreprocessing(backbone.preprocessing, name="imagenet_preprocessing"))
    return layers
