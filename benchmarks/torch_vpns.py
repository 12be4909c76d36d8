"""PyTorch re-statement of the original VPNs iteration, for benchmarking only.

Written from the reference sheet (`reference/vpns_reference.md` §1, §3, §4), not copied: it
reproduces what the original implementation *costs* per iteration on the same shapes, so that the
JAX steps can be compared against it in the same process, on the same threads.

What it does, like the original:

- every ``nn.Conv2d`` / ``nn.Linear`` is replaced by a scored layer (:class:`MaskedConv2d`,
  :class:`MaskedLinear`) holding ``popup_scores`` of the weight's shape, initialised with the scaled
  HYDRA init ``sqrt(6 / fan_in) * W / max|W|``;
- every forward recomputes the mask from the scores: ``m = GetSubnet(|s|, tau)`` (forward ``|s| >
  tau``, backward passes the gradient through unchanged), ``W_eff = W * m``;
- ``tau`` is ONE global threshold: the k-th smallest ``|s|`` over all scored layers
  (``torch.kthvalue`` on the concatenation), refreshed after every score step (twice per iteration);
- the pad prompt: zero-pad to the output size, add ``program * border_mask``, clamp to [0, 1],
  normalize;
- frequency label mapping: a fixed index vector into the 1000-way logits;
- one iteration = a prompted pass and an un-prompted pass, each with its own ``zero_grad`` /
  backward / optimizer step(s): Adam on scores + Adam on the prompt in mask finding, SGD (momentum
  0.9) on the weights + SGD on the prompt in tuning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Threshold:
    """The one global threshold shared by every scored layer (a plain holder, not a tensor leaf).

    ``tau`` is one 0-d tensor updated in place, so that ``torch.compile`` sees the same input
    tensor every iteration instead of recompiling for a new constant.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.tau: torch.Tensor = torch.tensor(-1.0, device=device)


class GetSubnet(torch.autograd.Function):
    """Binarize ``|s|`` at ``tau``; straight-through gradient to ``|s|``."""

    @staticmethod
    def forward(ctx, scores_abs: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (scores_abs > tau).to(scores_abs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def _scaled_scores(weight: torch.Tensor) -> torch.Tensor:
    fan_in = weight[0].numel()
    return math.sqrt(6.0 / fan_in) * weight / weight.abs().max()


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight * (|popup_scores| > tau)``."""

    def __init__(self, conv: nn.Conv2d, threshold: Threshold) -> None:
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=conv.bias is not None,
        )
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.popup_scores = nn.Parameter(_scaled_scores(conv.weight.detach()).clone())
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        mask = GetSubnet.apply(self.popup_scores.abs(), self.threshold.tau)
        return self._conv_forward(x, self.weight * mask, self.bias)


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``weight * (|popup_scores| > tau)``."""

    def __init__(self, linear: nn.Linear, threshold: Threshold) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.popup_scores = nn.Parameter(_scaled_scores(linear.weight.detach()).clone())
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        mask = GetSubnet.apply(self.popup_scores.abs(), self.threshold.tau)
        return F.linear(x, self.weight * mask, self.bias)


def replace_layers(model: nn.Module, threshold: Threshold) -> nn.Module:
    """Swap every Conv2d/Linear of ``model`` (in place) for its scored version."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(model, name, MaskedConv2d(child, threshold))
        elif isinstance(child, nn.Linear):
            setattr(model, name, MaskedLinear(child, threshold))
        else:
            replace_layers(child, threshold)
    return model


def score_params(model: nn.Module) -> list[nn.Parameter]:
    """Every ``popup_scores`` parameter, in module order."""
    return [p for n, p in model.named_parameters() if n.endswith("popup_scores")]


def weight_params(model: nn.Module) -> list[nn.Parameter]:
    """Every non-score parameter (conv/linear weights and biases, BN affine)."""
    return [p for n, p in model.named_parameters() if not n.endswith("popup_scores")]


@torch.no_grad()
def refresh_threshold(model: nn.Module, threshold: Threshold, density: float) -> None:
    """Set ``tau`` to the global k-th smallest ``|s|``, k = floor((1 - density) * N) (kthvalue)."""
    flat = torch.cat([s.detach().abs().flatten() for s in score_params(model)])
    k = int((1.0 - density) * flat.numel())
    if k >= 1:
        threshold.tau.copy_(torch.kthvalue(flat, k).values)


class PadPrompt(nn.Module):
    """The VPNs pad prompt: pad, add the border program, clamp to [0, 1], normalize."""

    def __init__(self, input_size: int, output_size: int, pad_size: int) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.program = nn.Parameter(torch.zeros(3, output_size, output_size))
        mask = torch.ones(3, output_size, output_size)
        inner = output_size - 2 * pad_size
        if inner > 0:
            mask[:, pad_size:pad_size + inner, pad_size:pad_size + inner] = 0
        self.register_buffer("mask", mask)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalization of images in [0, 1]."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        lo = (self.output_size - self.input_size + 1) // 2
        hi = (self.output_size - self.input_size) // 2
        if lo or hi:
            x = F.pad(x, (lo, hi, lo, hi), value=0.0)
        x = torch.clamp(x + self.program * self.mask, 0.0, 1.0)
        return self.normalize(x)


@dataclass
class Batch:
    """One iteration's data: prompt-loader batch and augmented train batch (NCHW, [0, 1])."""

    x_vp: torch.Tensor
    y_vp: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor


class VPNsTorch:
    """The original iteration: masked network + pad prompt + FLM, two passes per iteration."""

    def __init__(
        self,
        dense: nn.Module,
        *,
        input_size: int,
        output_size: int,
        pad_size: int,
        num_target: int,
        density: float,
        channels_last: bool = False,
        compile_model: bool = False,
        device: str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.threshold = Threshold(device)
        self.net = replace_layers(dense, self.threshold).to(device)
        self.prompt = PadPrompt(input_size, output_size, pad_size).to(device)
        self.mapping = torch.arange(num_target, device=device)
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
        self.density = density
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.forward_net = torch.compile(self.net) if compile_model else self.net
        refresh_threshold(self.net, self.threshold, density)
        scores, weights = score_params(self.net), weight_params(self.net)
        self.score_opt = torch.optim.Adam(scores, lr=1e-4, weight_decay=1e-4)
        self.prompt_adam = torch.optim.Adam(self.prompt.parameters(), lr=1e-4, weight_decay=1e-4)
        self.weight_opt = torch.optim.SGD(weights, lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.prompt_sgd = torch.optim.SGD(
            self.prompt.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
        )

    def set_stage(self, stage: str) -> None:
        """``'mask_finding'``: scores trainable, weights frozen; ``'tuning'``: the reverse."""
        prune = stage == "mask_finding"
        for p in score_params(self.net):
            p.requires_grad_(prune)
        for p in weight_params(self.net):
            p.requires_grad_(not prune)
        self.net.train()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            logits = self.forward_net(x.contiguous(memory_format=self.memory_format))
        return logits.float()[:, self.mapping]

    def _pass(self, x: torch.Tensor, y: torch.Tensor, prompted: bool, opts: list) -> float:
        inputs = self.prompt(x) if prompted else self.prompt.normalize(x)
        loss = F.cross_entropy(self._logits(inputs), y)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        return loss.detach()

    def mask_finding_iteration(self, batch: Batch) -> torch.Tensor:
        """Prompted then un-prompted pass; Adam on scores and prompt; tau refreshed after each."""
        opts = [self.score_opt, self.prompt_adam]
        self._pass(batch.x_vp, batch.y_vp, True, opts)
        refresh_threshold(self.net, self.threshold, self.density)
        loss = self._pass(batch.x_train, batch.y_train, False, opts)
        refresh_threshold(self.net, self.threshold, self.density)
        return loss

    def tuning_iteration(self, batch: Batch) -> torch.Tensor:
        """Prompted pass then un-prompted pass; SGD on weights and prompt; tau fixed."""
        opts = [self.weight_opt, self.prompt_sgd]
        self._pass(batch.x_vp, batch.y_vp, True, opts)
        return self._pass(batch.x_train, batch.y_train, False, opts)

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Eval mode, un-prompted, FLM logits; returns the number correct."""
        self.net.eval()
        logits = self._logits(self.prompt.normalize(x))
        self.net.train()
        return (logits.argmax(-1) == y).sum()

    def refresh(self) -> None:
        """One global threshold refresh (timed on its own by the benchmark)."""
        refresh_threshold(self.net, self.threshold, self.density)


class DenseTorch:
    """A plain fine-tune step of the unmodified model (SGD momentum 0.9, normalized input)."""

    def __init__(self, dense: nn.Module, *, channels_last: bool = False,
                 compile_model: bool = False, device: str = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.net = dense.train().to(device)
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.forward_net = torch.compile(self.net) if compile_model else self.net
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One forward/backward/SGD step."""
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            logits = self.forward_net(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach()
