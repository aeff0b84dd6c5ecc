"""What the training scripts share: seeding, augmentation, one epoch, and the ONNX export.

Torch is imported here and only here (and by the ``train_*`` scripts): it is the optional ``train``
extra; serving never needs it.

Augmentation mirrors the firewall's sanitiser: every input reaches the model resized (INTER_AREA)
and mildly blurred (3x3 Gaussian), so training blurs a share of its images with a random sigma and
accuracy holds on sanitised inputs.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.4, 1.0)


def seed_everything(seed: int, threads: int) -> torch.Generator:
    """Seeds every generator and asks torch for deterministic kernels; returns the data-order generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)  # float sums depend on how work is split, so fix it too
    return torch.Generator().manual_seed(seed)


class Normalize(nn.Module):
    """First layer of every bundled model, so the ONNX input stays plain pixels in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1], the models' input range; kept uint8 until batched to save memory."""
    return images.float().div(255)


def random_gaussian_blur(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blurs each image with probability BLUR_PROBABILITY by a 3x3 Gaussian of random sigma.

    Borders reflect as OpenCV's default (BORDER_REFLECT_101), the way the sanitiser blurs.
    """
    n, c, h, w = batch.shape
    sigma = torch.empty(n).uniform_(*BLUR_SIGMA_RANGE, generator=generator)
    taps = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3) ** 2) / (2 * sigma.view(n, 1) ** 2))
    taps = taps / taps.sum(dim=1, keepdim=True)
    blurred_now = torch.rand(n, generator=generator) < BLUR_PROBABILITY
    identity = torch.tensor([0.0, 1.0, 0.0]).expand(n, 3)
    taps = torch.where(blurred_now.view(n, 1), taps, identity)
    kernels = (taps.view(n, 3, 1) * taps.view(n, 1, 3)).repeat_interleave(c, dim=0).unsqueeze(1)
    padded = F.pad(batch.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernels, groups=n * c).view(n, c, h, w)


def random_translate(batch: torch.Tensor, max_shift: int, generator: torch.Generator, *, flip: bool) -> torch.Tensor:
    """Shifts each image by up to ``max_shift`` pixels (zero fill), and mirrors half of them if ``flip``."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    shifted = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        shifted = torch.where(mirrored.view(n, 1, 1, 1), shifted.flip(3), shifted)
    return shifted


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    augment: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    label_smoothing: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One pass over uint8 ``images`` [N, C, H, W] in a seeded order; returns the mean loss.

    ``loss_fn(logits, batch, labels)`` replaces the cross-entropy on the hard labels when given
    (distillation scores the logits against a teacher's answer on the same augmented batch).
    """
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    batches = tqdm(range(0, len(order), batch_size), desc="epoch", unit="batch", disable=None, leave=False, file=sys.stderr)
    for start in batches:  # a progress bar on a terminal only
        index = order[start : start + batch_size]
        batch = augment(to_unit_range(images[index])).contiguous(memory_format=torch.channels_last)
        logits = model(batch)
        if loss_fn is None:
            loss = F.cross_entropy(logits, labels[index], label_smoothing=label_smoothing)
        else:
            loss = loss_fn(logits, batch, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
    return total / len(order)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(
        (model(to_unit_range(images[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: Path) -> None:
    """Exports with Dropout nodes kept and BatchNorm on its running statistics.

    TrainingMode.TRAINING would also export BatchNorm in training mode (batch statistics), so the
    model goes to eval mode, only its Dropout modules back to train mode, and the export preserves
    each module's mode (legacy exporter; constant folding off so nothing folds the Dropouts away).
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout | nn.Dropout2d):
            module.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, *input_shape),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        dynamo=False,
    )
    model.eval()
    check_export(onnx.load(str(path)))


def check_export(model: onnx.ModelProto) -> None:
    """Fails unless the graph keeps at least two Dropout nodes and every BatchNorm uses running stats."""
    ops = [node.op_type for node in model.graph.node]
    if ops.count("Dropout") < 2:
        raise RuntimeError(f"exported graph has {ops.count('Dropout')} Dropout nodes, expected at least 2")
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and (len(node.output) > 1 or _attribute(node, "training_mode")):
            raise RuntimeError(f"BatchNormalization {node.name!r} was exported in training mode")
    onnx.checker.check_model(model)


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next((attr.i for attr in node.attribute if attr.name == name), 0)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.start:.0f}s"
