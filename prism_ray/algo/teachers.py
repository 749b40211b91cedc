"""Teacher and student architectures by name: torchvision classifiers plus small-input variants.

Small inputs (28/32 px) need a gentler stem than ImageNet's 4x early downsampling, but removing it
entirely makes a ResNet-18 epoch on Fashion-MNIST take ~25 minutes on 2 CPU cores. The small variants
therefore keep one stride-2 3x3 stem and drop the max-pool: an 8-16x total downsampling that leaves a
few spatial positions at the last stage while training in seconds per thousand images.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SMALL_INPUT_MAX = 64  # at or below this resolution, the small-input variant is built


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet: blocks of conv3x3-BN-ReLU-avgpool, then a linear head."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _torchvision(name: str) -> Callable[..., nn.Module]:
    """torchvision's model constructor `name`, imported when a model is first built: importing torchvision costs
    about a CPU-second (it imports torch._dynamo), which a worker that builds only ConvNets need not pay."""
    def construct(**kwargs) -> nn.Module:
        import torchvision.models
        return getattr(torchvision.models, name)(**kwargs)
    return construct


def _stem(in_channels: int, out_channels: int, stride: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def _resnet(name: str) -> Callable:
    fn = _torchvision(name)

    def build(num_classes: int, in_channels: int, small: bool) -> nn.Module:
        m = fn(num_classes=num_classes)
        if small:
            m.conv1 = _stem(in_channels, m.conv1.out_channels, 2)
            m.maxpool = nn.Identity()
        elif in_channels != 3:
            m.conv1 = nn.Conv2d(in_channels, m.conv1.out_channels, 7, 2, 3, bias=False)
        return m
    return build


def _first_conv_in(module: nn.Module, path: list, in_channels: int, small: bool) -> None:
    """Replace the conv at `path` with one taking `in_channels` (3x3, stride 2 when small)."""
    parent = module
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = path[-1]
    old = parent[last] if isinstance(last, int) else getattr(parent, last)
    if small:
        new = _stem(in_channels, old.out_channels, 2, bias=old.bias is not None)
    else:
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def _stem_at_features(name: str, **kwargs) -> Callable:
    fn = _torchvision(name)

    """MobileNet / EfficientNet family: the stem conv is features[0][0]."""
    def build(num_classes: int, in_channels: int, small: bool) -> nn.Module:
        m = fn(num_classes=num_classes, **kwargs)
        if small or in_channels != 3:
            _first_conv_in(m, ["features", 0, 0], in_channels, small)
        return m
    return build


def _shufflenet(name: str) -> Callable:
    fn = _torchvision(name)

    def build(num_classes: int, in_channels: int, small: bool) -> nn.Module:
        m = fn(num_classes=num_classes)
        if small or in_channels != 3:
            _first_conv_in(m, ["conv1", 0], in_channels, small)
        if small:
            m.maxpool = nn.Identity()
        return m
    return build


def _alexnet(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    m = _torchvision("alexnet")(num_classes=num_classes)
    if small:
        # 11x11 stride 4 then three max-pools would leave nothing of a 28 px image.
        m.features[0] = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1)
    elif in_channels != 3:
        m.features[0] = nn.Conv2d(in_channels, 64, 11, stride=4, padding=2)
    return m


def _densenet(name: str) -> Callable:
    fn = _torchvision(name)

    def build(num_classes: int, in_channels: int, small: bool) -> nn.Module:
        m = fn(num_classes=num_classes)
        if small:
            m.features.conv0 = _stem(in_channels, m.features.conv0.out_channels, 2)
            m.features.pool0 = nn.Identity()
        elif in_channels != 3:
            m.features.conv0 = nn.Conv2d(in_channels, m.features.conv0.out_channels, 7, 2, 3, bias=False)
        return m
    return build


def _vgg(name: str) -> Callable:
    fn = _torchvision(name)

    def build(num_classes: int, in_channels: int, small: bool) -> nn.Module:
        m = fn(num_classes=num_classes)
        if in_channels != 3:
            m.features[0] = nn.Conv2d(in_channels, m.features[0].out_channels, 3, padding=1)
        if small:  # five 2x max-pools would leave nothing of 28 px: keep the last three
            pools = [i for i, layer in enumerate(m.features) if isinstance(layer, nn.MaxPool2d)]
            for i in pools[:2]:
                m.features[i] = nn.Identity()
        return m
    return build


def _convnet(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    return ConvNet(num_classes, in_channels, depth=3 if small else 5)


def _probe(num_classes: int, in_channels: int, small: bool) -> nn.Module:
    """One patchifying convolution, batch norm, pooling and a linear head: ~2.4 MFLOP per 224-px image (ShuffleNetV2
    x0.5 takes 42). For rehearsals and tests where the networks' cost would hide what is measured (the data path,
    memory, storage), not for distillation: it has a BN layer to align and a penultimate feature for diversity."""
    patch = 4 if small else 16
    return nn.Sequential(nn.Conv2d(in_channels, 16, patch, stride=patch), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(inplace=True),
                         nn.Linear(32, num_classes))


ARCHITECTURES: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "convnet": _convnet,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    "resnet152": _resnet("resnet152"),
    "wide_resnet50_2": _resnet("wide_resnet50_2"),
    "mobilenet_v2": _stem_at_features("mobilenet_v2"),
    # no torchvision weights: for small data
    "mobilenet_v2_x0_5": _stem_at_features("mobilenet_v2", width_mult=0.5),
    "mobilenet_v3_small": _stem_at_features("mobilenet_v3_small"),
    "mobilenet_v3_large": _stem_at_features("mobilenet_v3_large"),
    "efficientnet_b0": _stem_at_features("efficientnet_b0"),
    "efficientnet_b1": _stem_at_features("efficientnet_b1"),
    "shufflenet_v2_x0_5": _shufflenet("shufflenet_v2_x0_5"),
    "shufflenet_v2_x1_0": _shufflenet("shufflenet_v2_x1_0"),
    "alexnet": _alexnet,
    "densenet121": _densenet("densenet121"),
    "vgg11_bn": _vgg("vgg11_bn"),
    "vgg16_bn": _vgg("vgg16_bn"),
    "probe": _probe,
}


class TeacherError(ValueError):
    """A teacher cannot be built or its weights do not fit: the message says which and why."""


@dataclass(frozen=True)
class ModelShape:
    num_classes: int
    in_channels: int
    resolution: int

    @property
    def small(self) -> bool:
        return self.resolution <= SMALL_INPUT_MAX


def build_model(arch: str, shape: ModelShape, seed: int | None = None) -> nn.Module:
    """A freshly initialised network of `arch` for inputs of `shape`; with `seed`, initialised from it
    without touching the global RNG (every worker then builds the same network)."""
    if arch not in ARCHITECTURES:
        raise TeacherError(f"unknown architecture {arch!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
    if seed is None:
        return ARCHITECTURES[arch](shape.num_classes, shape.in_channels, shape.small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[arch](shape.num_classes, shape.in_channels, shape.small)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def checkpoint_bytes(model: nn.Module, arch: str, shape: ModelShape, **extra) -> bytes:
    """Serialise a model with what is needed to rebuild it (arch and shape) and any metadata. The weights are
    stored on the CPU in NCHW order whatever device and layout the model was trained in (NHWC, on a GPU)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"arch": arch, "num_classes": shape.num_classes, "in_channels": shape.in_channels,
                "resolution": shape.resolution, "state_dict": state, **extra}, buf)
    return buf.getvalue()


def load_checkpoint(data: bytes, arch: str, shape: ModelShape, source: str = "checkpoint") -> nn.Module:
    """Rebuild `arch` for `shape` from checkpoint bytes (ours, or a bare state_dict) and check they fit."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise TeacherError(f"{source}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        if obj.get("arch") not in (None, arch):
            raise TeacherError(f"{source}: checkpoint is a {obj['arch']!r}, the config says {arch!r}")
        for key, want in (("num_classes", shape.num_classes), ("in_channels", shape.in_channels)):
            if key in obj and obj[key] != want:
                raise TeacherError(f"{source}: checkpoint has {key}={obj[key]}, the data needs {want}")
        state = obj["state_dict"]
    elif isinstance(obj, dict):
        state = obj
    else:
        raise TeacherError(f"{source}: expected a state_dict or a prism-ray checkpoint, got {type(obj).__name__}")
    model = build_model(arch, shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise TeacherError(f"{source}: weights do not fit {arch} for {shape}: {' '.join(first)}") from None
    return model


def torchvision_weights(arch: str, weights_name: str):
    """The torchvision weights enum member `weights_name` of `arch` (no download); TeacherError names the choices."""
    if not weights_name:
        raise TeacherError("torchvision: needs a weights name, e.g. torchvision:IMAGENET1K_V1")
    import torchvision.models
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        raise TeacherError(f"torchvision has no published weights for {arch!r}; use weights: squeeze, random or a "
                           f"checkpoint URI") from None
    try:
        return enum[weights_name]
    except KeyError:
        allowed = ", ".join(m.name for m in enum)
        raise TeacherError(f"no torchvision weights {weights_name!r} for {arch}; allowed: {allowed}") from None


def load_torchvision(arch: str, weights_name: str, shape: ModelShape) -> nn.Module:
    """A torchvision model with its published weights (downloaded once into TORCH_HOME)."""
    if shape.small or shape.in_channels != 3:
        raise TeacherError(f"torchvision weights for {arch} need 3-channel inputs above {SMALL_INPUT_MAX} px; "
                           f"data is {shape.in_channels} channel(s) at {shape.resolution} px")
    weights = torchvision_weights(arch, weights_name)
    n = len(weights.meta.get("categories", []))
    if n and n != shape.num_classes:
        raise TeacherError(f"torchvision weights {arch}:{weights_name} have {n} classes, the data has "
                           f"{shape.num_classes}")
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # noqa: BLE001 - offline clusters fail here: say so plainly
        raise TeacherError(f"could not fetch torchvision weights {arch}:{weights_name} ({e}); on machines without "
                           f"internet, give a checkpoint URI as the weights instead") from None
    model = build_model(arch, shape)
    model.load_state_dict(state)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: teachers are read, never trained, during synthesis."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
