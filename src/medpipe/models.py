"""One model registry: name -> MONAI class + keyword arguments, read by ``create_model`` (training,
package loading) and by every export (the MONAI bundle's ``network_def``). Adding a model is one entry.

Weights: ``init_weights`` loads a local ``.safetensors`` file or a ``torch.save`` state dict (read
with ``weights_only=True``); ``pretrained=True`` uses MONAI's own download (ImageNet weights for the
DenseNets, ResNets via MedicalNet are 3D-only so not offered, EfficientNet, SE-ResNet) and, offline,
fails with a message that says how to pass a local file instead. A classifier head whose shape does
not match ``num_classes`` is left at its fresh initialisation, as timm does.

Metadata (``metadata_dim`` > 0), two fusions (config key ``metadata_fusion``, recorded in the package's
metadata spec): ``concat`` wraps the registry's network with its classifier layer taken off, so the image
gives its pooled features; a small MLP encodes the patient-metadata vector (medpipe.data.metadata); the two
are concatenated (late fusion) into a linear head. ``metablock`` (DenseNets) lets the metadata gate the
image's last feature maps channel by channel before pooling (MetaBlock). ``forward(x)`` alone means "no
metadata" (the vector of zeros every missing field encodes to).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module loads neither torch nor MONAI
    import torch
    from torch import nn

import logging
from dataclasses import dataclass, field
from pathlib import Path

from medpipe.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDef:
    """How to build one architecture: a MONAI class (its import path, which is also the bundle's
    ``_target_``), the fixed keyword arguments, and the names its constructor gives to the number of
    classes, dropout and ImageNet weights (``None`` where it has no such argument)."""

    target: str
    kwargs: dict = field(default_factory=dict)
    classes_arg: str = "num_classes"
    dropout_arg: str | None = None
    pretrained_arg: str | None = "pretrained"
    dropout_none_when_zero: bool = False  # SE-ResNets take None, not 0.0, for "no dropout"

    def build_kwargs(self, num_classes: int, pretrained: bool = False, dropout: float = 0.0) -> dict:
        kw = {**self.kwargs, self.classes_arg: int(num_classes)}
        if self.pretrained_arg:
            kw[self.pretrained_arg] = bool(pretrained)
        if self.dropout_arg:
            kw[self.dropout_arg] = (dropout or None) if self.dropout_none_when_zero else float(dropout)
        return kw


_NETS = "monai.networks.nets."
_DENSE = dict(spatial_dims=2, in_channels=3)
REGISTRY: dict[str, ModelDef] = {
    **{f"densenet{d}": ModelDef(f"{_NETS}DenseNet{d}", _DENSE, "out_channels", "dropout_prob")
       for d in (121, 169, 201)},
    # MONAI's ResNet weights are 3D (MedicalNet): --pretrained is refused for them
    **{f"resnet{d}": ModelDef(f"{_NETS}resnet{d}", dict(spatial_dims=2, n_input_channels=3), pretrained_arg=None)
       for d in (18, 34, 50)},
    **{f"efficientnet-b{i}": ModelDef(f"{_NETS}EfficientNetBN", dict(model_name=f"efficientnet-b{i}", **_DENSE))
       for i in (0, 1, 2)},
    # a 4-block DenseNet of 0.03M parameters: smoke tests, CI and quick CPU checks of the whole pipeline
    # (timm keeps test_* models for the same reason); never a clinical model
    "densenet-test": ModelDef(f"{_NETS}DenseNet", dict(_DENSE, init_features=16, growth_rate=8, block_config=(2, 2, 2, 2)),
                              "out_channels", "dropout_prob", pretrained_arg=None),
    "seresnet50": ModelDef(f"{_NETS}SEResNet50", _DENSE, dropout_arg="dropout_prob", dropout_none_when_zero=True),
    "seresnext50": ModelDef(f"{_NETS}SEResNext50", _DENSE, dropout_arg="dropout_prob", dropout_none_when_zero=True),
}
MODEL_NAMES = tuple(REGISTRY)


def model_def(name: str) -> ModelDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}") from None


def bundle_target(name: str, num_classes: int) -> dict:
    """The MONAI bundle ``network_def`` that rebuilds ``name`` (read from the same registry as
    :func:`create_model`; never pretrained: the bundle loads its own weights)."""
    d = model_def(name)
    return {"_target_": d.target, **d.build_kwargs(num_classes)}


def _build(d: ModelDef, kwargs: dict) -> nn.Module:
    import importlib

    module, _, cls = d.target.rpartition(".")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def create_model(name: str, num_classes: int, *, pretrained: bool = False, init_weights: str | None = None,
                 dropout: float = 0.0, metadata_dim: int = 0, fusion: str = "concat") -> nn.Module:
    """The registry's network ``name``; with ``metadata_dim`` > 0 wrapped in the metadata fusion ``fusion``
    (concat or metablock; pretrained or init weights go into the image network first)."""
    d = model_def(name)
    if pretrained and not d.pretrained_arg:
        raise ConfigError(f"--pretrained is not available for {name}: MONAI's ResNet weights are 3D "
                          "(MedicalNet); pass --init-weights FILE with a 2D state dict instead")
    try:
        model = _build(d, d.build_kwargs(num_classes, pretrained, dropout))
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
    if metadata_dim:
        model = fuse_metadata(model, num_classes, metadata_dim, dropout, fusion)
    return model


META_HIDDEN = 32  # width of the metadata encoder


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, layer) of the network's classifier: its last ``nn.Linear``."""
    from torch import nn

    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = name, module
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to fuse metadata with")
    parent_name, _, attr = found[0].rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr, found[1]


def _feature_trunk(image: nn.Module) -> tuple[nn.Module, int]:
    """(the part of ``image`` that gives its last feature maps, their channel count) for MetaBlock: the
    DenseNets' ``features`` and the ReLU their classifier starts with. Other networks pool inside ``forward``,
    so their maps cannot be gated without rewriting it: ConfigError saying so."""
    from torch import nn

    layers = getattr(image, "class_layers", None)
    if not isinstance(getattr(image, "features", None), nn.Module) or not isinstance(layers, nn.Sequential) \
            or not isinstance(getattr(layers, "out", None), nn.Linear):
        raise ConfigError(f"metadata_fusion metablock gates a DenseNet's feature maps; {type(image).__name__} "
                          "has none to gate: use metadata_fusion concat")
    return nn.Sequential(image.features, nn.ReLU()), layers.out.in_features


def _fusion_classes() -> dict[str, type]:
    from torch import nn
    import torch

    class MetadataFusion(nn.Module):
        """Image features (the network minus its classifier) concatenated with an encoding of the metadata
        vector, then a linear head. ``forward(x, m=None)``: ``m`` (N x metadata_dim) or None for none given."""

        def __init__(self, image: nn.Module, num_classes: int, metadata_dim: int, dropout: float = 0.0):
            super().__init__()
            parent, attr, linear = _last_linear(image)
            setattr(parent, attr, nn.Identity())
            self.image, self.metadata_dim = image, int(metadata_dim)
            self.encoder = nn.Sequential(nn.Linear(metadata_dim, META_HIDDEN), nn.ReLU(),
                                         nn.Linear(META_HIDDEN, META_HIDDEN), nn.ReLU())
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(linear.in_features + META_HIDDEN, num_classes))

        def forward(self, x: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
            f = self.image(x)
            if m is None:
                m = f.new_zeros((f.shape[0], self.metadata_dim))
            return self.head(torch.cat([f, self.encoder(m.to(f.dtype))], dim=1))

    class MetaBlockFusion(nn.Module):
        """MetaBlock (Pacheco & Krohling 2021, "An attention-based mechanism to combine images and metadata in
        deep learning models applied to skin cancer classification"): the metadata gates each channel of the
        image network's last feature maps, ``F' = sigmoid(tanh(F * f(m)) + g(m))`` with ``f``, ``g`` linear +
        BatchNorm, then global average pooling and a linear head. ``forward(x, m=None)`` as concat's."""

        def __init__(self, image: nn.Module, num_classes: int, metadata_dim: int, dropout: float = 0.0):
            super().__init__()
            self.image, channels = _feature_trunk(image)
            self.metadata_dim = int(metadata_dim)
            self.fb = nn.Sequential(nn.Linear(metadata_dim, channels), nn.BatchNorm1d(channels))
            self.gb = nn.Sequential(nn.Linear(metadata_dim, channels), nn.BatchNorm1d(channels))
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

        def forward(self, x: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
            f = self.image(x)
            if m is None:
                m = f.new_zeros((f.shape[0], self.metadata_dim))
            m = m.to(f.dtype)
            gated = torch.sigmoid(torch.tanh(f * self.fb(m)[:, :, None, None]) + self.gb(m)[:, :, None, None])
            return self.head(gated.mean(dim=(2, 3)))

    return {"concat": MetadataFusion, "metablock": MetaBlockFusion}


def fuse_metadata(image: nn.Module, num_classes: int, metadata_dim: int, dropout: float = 0.0,
                  fusion: str = "concat") -> nn.Module:
    """``image`` (a registry network) with its classifier replaced by the metadata fusion head ``fusion``."""
    classes = _fusion_classes()
    if fusion not in classes:
        raise ConfigError(f"metadata_fusion must be one of {', '.join(classes)}, got {fusion!r}")
    return classes[fusion](image, num_classes, metadata_dim, dropout)


# the weights file of a model package (medpipe.package), which --init-weights also takes as a folder
PACKAGE_WEIGHTS = "weights.safetensors"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, a weights-only torch state dict, or a model package folder (its
    ``weights.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        if not (path / PACKAGE_WEIGHTS).is_file():
            raise ConfigError(f"--init-weights: folder {path} holds no {PACKAGE_WEIGHTS} (not a model package)")
        path = path / PACKAGE_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"--init-weights: file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConfigError(f"--init-weights: {path.name} is not a valid safetensors file ({exc})") from None
    import torch

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
