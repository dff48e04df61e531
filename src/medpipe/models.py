"""``create_model(name, num_classes)`` over MONAI's 2D classifiers.

Weights: ``init_weights`` loads a local ``.safetensors`` file or a ``torch.save`` state dict (read
with ``weights_only=True``); ``pretrained=True`` uses MONAI's own download (ImageNet weights for the
DenseNets, ResNets via MedicalNet are 3D-only so not offered, EfficientNet, SE-ResNet) and, offline,
fails with a message that says how to pass a local file instead. A classifier head whose shape does
not match ``num_classes`` is left at its fresh initialisation, as timm does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from medpipe.errors import ConfigError

log = logging.getLogger(__name__)


def _densenet(cls_name):
    def make(num_classes, pretrained, dropout):
        from monai.networks import nets
        return getattr(nets, cls_name)(spatial_dims=2, in_channels=3, out_channels=num_classes,
                                       pretrained=pretrained, dropout_prob=dropout)
    return make


def _resnet(fn_name):
    def make(num_classes, pretrained, dropout):
        from monai.networks import nets
        if pretrained:
            raise ConfigError(f"--pretrained is not available for {fn_name}: MONAI's ResNet weights are 3D "
                              "(MedicalNet); pass --init-weights FILE with a 2D state dict instead")
        return getattr(nets, fn_name)(spatial_dims=2, n_input_channels=3, num_classes=num_classes)
    return make


def _efficientnet(variant):
    def make(num_classes, pretrained, dropout):
        from monai.networks.nets import EfficientNetBN
        return EfficientNetBN(variant, pretrained=pretrained, spatial_dims=2, in_channels=3, num_classes=num_classes)
    return make


def _seresnet(cls_name):
    def make(num_classes, pretrained, dropout):
        from monai.networks import nets
        return getattr(nets, cls_name)(spatial_dims=2, in_channels=3, num_classes=num_classes,
                                       pretrained=pretrained, dropout_prob=dropout or None)
    return make


MODEL_NAMES = {
    "densenet121": _densenet("DenseNet121"),
    "densenet169": _densenet("DenseNet169"),
    "densenet201": _densenet("DenseNet201"),
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "efficientnet-b0": _efficientnet("efficientnet-b0"),
    "efficientnet-b1": _efficientnet("efficientnet-b1"),
    "efficientnet-b2": _efficientnet("efficientnet-b2"),
    "seresnet50": _seresnet("SEResNet50"),
    "seresnext50": _seresnet("SEResNext50"),
}


def bundle_target(name: str, num_classes: int) -> dict:
    """The MONAI bundle ``network_def`` that rebuilds ``name`` (for ``medpipe export --format bundle``)."""
    if name.startswith("densenet"):
        return {"_target_": f"DenseNet{name[8:]}", "spatial_dims": 2, "in_channels": 3, "out_channels": num_classes}
    if name.startswith("resnet"):
        return {"_target_": f"monai.networks.nets.{name}", "spatial_dims": 2, "n_input_channels": 3,
                "num_classes": num_classes}
    if name.startswith("efficientnet"):
        return {"_target_": "EfficientNetBN", "model_name": name, "pretrained": False, "spatial_dims": 2,
                "in_channels": 3, "num_classes": num_classes}
    if name in ("seresnet50", "seresnext50"):
        return {"_target_": {"seresnet50": "SEResNet50", "seresnext50": "SEResNext50"}[name], "spatial_dims": 2,
                "in_channels": 3, "num_classes": num_classes, "pretrained": False}
    raise ConfigError(f"unknown model {name!r}")


def create_model(name: str, num_classes: int, *, pretrained: bool = False, init_weights: str | None = None,
                 dropout: float = 0.0) -> nn.Module:
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODEL_NAMES)}")
    try:
        model = MODEL_NAMES[name](num_classes, pretrained, dropout)
    except ConfigError:
        raise
    except Exception as exc:  # network failures surface from deep inside hub/urllib
        if pretrained:
            raise ConfigError(
                f"--pretrained could not fetch ImageNet weights for {name} ({exc.__class__.__name__}: "
                f"{str(exc)[:120]}). Offline? Download them elsewhere and pass --init-weights FILE "
                "(a .safetensors or state-dict .pt file) instead of --pretrained.") from None
        raise
    if init_weights:
        load_init_weights(model, init_weights)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init-weights: file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"--init-weights: {path.name} is not a valid safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--init-weights: {path.name} could not be read as a weights-only state dict "
                          f"({exc.__class__.__name__}); pickled objects are refused") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"--init-weights: {path.name} does not hold a state dict")
    return state


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    state = load_state_dict_file(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise ConfigError(f"--init-weights: no tensor in {Path(path).name} matches the model's names and shapes")
    model.load_state_dict(usable, strict=False)
    log.info("init weights: loaded %d tensors from %s, skipped %d (e.g. a classifier head of another size)",
             len(usable), Path(path).name, len(skipped))
