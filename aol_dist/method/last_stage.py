"""The last stage's M meta-gradients and M meta forwards as hand-written passes batched over the label sets.

The M meta-gradients grad L_C(y_hat, y_m) (Eq. 1) are vector-Jacobian products of the one forward
graph with the cotangents c_m = (sigmoid(z) - y_m) / (B N) at the logits; they differ only by the
labels, so every activation the backward pass reads is shared by the M passes. For the last stage,
the text layers and the head (all of theta in the partial meta scope; the full scope continues into
the trunk with autograd from the M gradients this pass returns at the trunk activation):

- backward: batch norm (train mode, batch statistics) and ReLU are elementwise with per-m
  reductions; a convolution's input gradient is one transposed convolution of the M x B stacked
  output gradients; its weight gradient is G_m^T im2col(x), with ``x`` unfolded once for all m;
- forward under theta_m: a convolution's update has rank <= L = B x (output positions), so when L is
  small against the layer (L (K + C_out) < C_out K, K = C_in k k) the meta forward applies it as
  conv(a_m, W) - alpha G_m^T (im2col(x) im2col(a_m)^T) without ever forming W_m (on the CPU
  default benchmark L = 64 against C_out = 512, K = 4608); otherwise W_m = W - alpha G_m^T im2col(x)
  is formed by one GEMM with W as its addend and run as a convolution per label set.

Written out for ResNet BasicBlock / Bottleneck stages (torchvision, and timm's when they have no
extras such as SE or drop-path), global average pooling and the text layers; :func:`supported`
says when it applies, otherwise the caller uses autograd and ``functional_call``
(``aol.meta_features_fast``). The tests compare it with the reference step (tests/test_fast_step.py,
tests/test_last_stage.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aol_dist.model.backbone import Classifier


@dataclass
class Unit:
    """conv -> batch norm [-> ReLU], with what the backward pass reads."""

    conv: nn.Conv2d
    norm: nn.BatchNorm2d
    relu: bool
    x: torch.Tensor | None = None
    """The convolution's input."""
    h: torch.Tensor | None = None
    """The convolution's output (batch norm's input)."""
    y: torch.Tensor | None = None
    """Batch norm's output (its sign is the ReLU mask)."""
    cols: torch.Tensor | None = None
    """im2col(x): (L, K)."""
    g_out: torch.Tensor | None = None
    """The M gradients at the convolution's output, (M, C_out, L): the low-rank form of W_m."""
    weight_m: torch.Tensor | None = None
    """W_m, (M, *W.shape), when forming it is cheaper than the low-rank form."""
    gamma_m: torch.Tensor | None = None
    beta_m: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x, self.h = x.detach(), self.conv(x)
        y = self.norm(self.h)  # the module itself: running statistics update exactly as in the plain forward
        self.y = y.detach()
        return F.relu(y) if self.relu else y


@dataclass
class Block:
    """A residual block: main path of units, shortcut (identity or one unit), sum, ReLU."""

    main: list[Unit]
    shortcut: Unit | None
    s: torch.Tensor | None = None
    """The sum before the last ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for unit in self.main:
            out = unit.forward(out)
        s = out + (self.shortcut.forward(x) if self.shortcut is not None else x)
        self.s = s.detach()
        return F.relu(s)


@dataclass
class Tape:
    """The recorded forward of the last stage and the head (read by :func:`meta_backward`, :func:`meta_forward`)."""

    blocks: list[Block]
    features: torch.Tensor | None = None
    text: list[torch.Tensor] = field(default_factory=list)
    """Text layers: input, first ReLU output, second ReLU output."""
    text_m: list[torch.Tensor] = field(default_factory=list)
    """Text layers under theta_m: W1_m, b1_m, W2_m, b2_m, each (M, *shape)."""


def _is(module: nn.Module | None, kind: type) -> bool:
    return type(module) is kind


def _plain_conv(conv: nn.Module) -> bool:
    return (_is(conv, nn.Conv2d) and conv.groups == 1 and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _plain_norm(norm: nn.Module) -> bool:
    return _is(norm, nn.BatchNorm2d) and norm.affine


def _identity(module: nn.Module | None) -> bool:
    return module is None or _is(module, nn.Identity)


def _relu(module: nn.Module | None) -> bool:
    return _is(module, nn.ReLU)


def _block(block: nn.Module) -> Block | None:
    """The block as units, or None if it is not a plain ResNet block this module knows."""
    name = type(block).__name__
    if name not in ("BasicBlock", "Bottleneck"):
        return None
    depth = 2 if name == "BasicBlock" else 3
    convs = [getattr(block, f"conv{i}", None) for i in range(1, depth + 1)]
    norms = [getattr(block, f"bn{i}", None) for i in range(1, depth + 1)]
    if not all(_plain_conv(c) for c in convs) or not all(_plain_norm(n) for n in norms):
        return None
    if type(block).__module__.startswith("timm"):
        acts = [getattr(block, f"act{i}", None) for i in range(1, depth + 1)]
        extras = [getattr(block, a, None) for a in ("drop_block", "aa", "se", "drop_path")]
        if not all(_relu(a) for a in acts) or not all(_identity(e) for e in extras):
            return None
    elif not _relu(getattr(block, "relu", None)):
        return None
    shortcut = None
    if block.downsample is not None:
        down = list(block.downsample) if isinstance(block.downsample, nn.Sequential) else []
        if len(down) != 2 or not _plain_conv(down[0]) or not _plain_norm(down[1]):
            return None
        shortcut = Unit(down[0], down[1], relu=False)
    main = [Unit(c, n, relu=i < depth - 1) for i, (c, n) in enumerate(zip(convs, norms))]
    return Block(main, shortcut)


def _blocks(stage: nn.Module) -> list[Block] | None:
    modules = list(stage) if isinstance(stage, nn.Sequential) else [stage]
    blocks = [_block(m) for m in modules]
    return None if any(b is None for b in blocks) else blocks


def supported(model: nn.Module) -> bool:
    """True for a :class:`Classifier` in train mode whose last stage is made of plain ResNet blocks."""
    return (isinstance(model, Classifier) and model.training and _is(model.pool, nn.AdaptiveAvgPool2d)
            and model.pool.output_size in (1, (1, 1)) and _blocks(model.stages[-1]) is not None)


def recorded_top(model: nn.Module, trunk: torch.Tensor, text: torch.Tensor | None = None) -> tuple[torch.Tensor, Tape]:
    """Logits from the trunk activation, as ``model(trunk, text, from_trunk=True)``, and the tape.

    The same modules run in the same order (batch-norm running statistics update identically); the
    ReLUs are out of place so the recorded activations stay intact. Not checkpointed: the last stage
    keeps its activations for the M meta-gradients.
    """
    tape = Tape(_blocks(model.stages[-1]))
    a = trunk
    for block in tape.blocks:
        a = block.forward(a)
    f = model.pool(a).flatten(1)
    if model.text is not None:
        if text is None:
            raise ValueError("this classifier has a text branch: pass the report vectors")
        first, _, second, _ = model.text.layers
        r1 = F.relu(first(text))
        r2 = F.relu(second(r1))
        tape.text = [text.detach(), r1.detach(), r2.detach()]
        f = torch.cat([f, r2], dim=1)
    tape.features = f.detach()
    return model.head(f), tape


def _updated(param: nn.Parameter, grad: torch.Tensor, meta_lr: float) -> torch.Tensor:
    """theta_m = theta - alpha grad_m (Eq. 1), in the parameter's precision."""
    return torch.add(param.detach(), grad.to(param.dtype), alpha=-meta_lr)


def _im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, P, K): the convolution's input patches at its P output positions."""
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        return x[:, :, ::conv.stride[0], ::conv.stride[1]].flatten(2).transpose(1, 2)  # 1x1: a subsample
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)


def _statistics_precision(h: torch.Tensor) -> torch.Tensor:
    """``h`` in at least float32: batch statistics of half-precision activations are taken in float32."""
    return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h


def _norm_backward(unit: Unit, g: torch.Tensor, meta_lr: float) -> torch.Tensor:
    """Batch norm in train mode, for the M stacked output gradients g (M, B, C, H, W); sets gamma_m, beta_m."""
    h = _statistics_precision(unit.h.detach())
    dims = (0, 2, 3)
    mean = h.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(h.var(dims, unbiased=False, keepdim=True) + unit.norm.eps)
    x_hat = ((h - mean) * inv_std).to(g.dtype)
    n = h.numel() / h.shape[1]
    g_beta = g.sum((1, 3, 4))  # (M, C)
    g_gamma = (g * x_hat).sum((1, 3, 4))
    unit.gamma_m = _updated(unit.norm.weight, g_gamma, meta_lr)
    unit.beta_m = _updated(unit.norm.bias, g_beta, meta_lr)
    scale = (unit.norm.weight.detach() * inv_std.flatten()).to(g.dtype)
    g_h = g - g_beta[:, None, :, None, None] / n - x_hat * (g_gamma[:, None, :, None, None] / n)
    return g_h * scale[None, :, None, None]


LOW_RANK: bool | None = None
"""Force the low-rank form (True) or formed W_m (False) for every convolution; None: whichever is cheaper."""


def _low_rank(length: int, k: int, c_out: int) -> bool:
    """Applying W_m in low-rank form costs L (K + C_out) per label set and position, forming it C_out K."""
    return LOW_RANK if LOW_RANK is not None else length * (k + c_out) < c_out * k


def _conv_backward(unit: Unit, g: torch.Tensor, meta_lr: float, need_input: bool) -> torch.Tensor | None:
    """Keeps W_m in low-rank form (G_m, im2col(x)) or forms it by one GEMM; g_x by one transposed convolution."""
    conv, x = unit.conv, unit.x
    m, b, c_out, h, w = g.shape
    unit.cols = _im2col(conv, x).reshape(b * h * w, -1).to(g.dtype)  # (L, K)
    unit.g_out = g.permute(0, 2, 1, 3, 4).reshape(m, c_out, b * h * w)  # (M, C_out, L)
    length, k = unit.cols.shape
    weight = conv.weight.detach()
    if not _low_rank(length, k, c_out):
        if weight.dtype == g.dtype:
            # reshape, not view: a channels_last weight is not (C_out, K)-contiguous (copied, in K = C k k order)
            unit.weight_m = torch.baddbmm(weight.reshape(1, c_out, k), unit.g_out, unit.cols.expand(m, length, k),
                                          alpha=-meta_lr).view(m, *weight.shape)
        else:  # autocast: the GEMM in the activations' precision, the update in the parameters'
            unit.weight_m = _updated(conv.weight, torch.matmul(unit.g_out, unit.cols).view(m, *weight.shape), meta_lr)
        unit.g_out = unit.cols = None
    if not need_input:
        return None
    g_x = torch.nn.grad.conv2d_input((m * b, *x.shape[1:]), weight.to(g.dtype), g.reshape(m * b, c_out, h, w),
                                     conv.stride, conv.padding, conv.dilation, conv.groups)
    return g_x.view(m, b, *x.shape[1:])


def _unit_backward(unit: Unit, g: torch.Tensor, meta_lr: float, need_input: bool) -> torch.Tensor | None:
    if unit.relu:
        g = g * (unit.y > 0).to(g.dtype)
    return _conv_backward(unit, _norm_backward(unit, g, meta_lr), meta_lr, need_input)


def _linear_backward(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor, meta_lr: float | None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y = x W^T + b for M stacked output gradients g (M, B, out): g_x (M, B, in), and [W_m, b_m] unless
    ``meta_lr`` is None."""
    g_x = torch.matmul(g, layer.weight.detach().to(g.dtype))
    if meta_lr is None:
        return g_x, []
    return g_x, [_updated(layer.weight, torch.einsum("mbo,bi->moi", g, x.to(g.dtype)), meta_lr),
                 _updated(layer.bias, g.sum(1), meta_lr)]


def meta_backward(model: nn.Module, tape: Tape, cotangents: torch.Tensor, meta_lr: float,
                  trunk_gradient: bool = False) -> torch.Tensor | None:
    """Eq. 1 for every m at once: theta_m = theta - alpha grad L_C(y_hat, y_m) for the last stage and text layers.

    ``cotangents`` (B, M, N): dL_C(y_hat, y_m)/dz = (sigmoid(z) - y_m) / (B N). The head is not
    updated here: the meta forwards stop at the features. With ``trunk_gradient`` (full scope) returns
    the M gradients at the trunk activation, (M, B, C, H, W), for the trunk's own vector-Jacobian products.
    """
    dtype = tape.blocks[-1].s.dtype
    c = cotangents.transpose(0, 1).to(dtype)  # (M, B, N)
    g_f, _ = _linear_backward(model.head, tape.features, c, None)
    if model.text is not None:
        first, _, second, _ = model.text.layers
        t0, r1, r2 = tape.text
        g_a2 = g_f[..., model.image_dim:] * (r2 > 0).to(dtype)
        g_r1, second_m = _linear_backward(second, r1, g_a2, meta_lr)
        _, first_m = _linear_backward(first, t0, g_r1 * (r1 > 0).to(dtype), meta_lr)
        tape.text_m = first_m + second_m
    last = tape.blocks[-1].s
    g = (g_f[..., :model.image_dim] / (last.shape[2] * last.shape[3]))[..., None, None]
    g = g.expand(*g.shape[:3], *last.shape[2:])
    for i in reversed(range(len(tape.blocks))):
        block, need_input = tape.blocks[i], i > 0 or trunk_gradient
        g = g * (block.s > 0).to(dtype)
        g_main = g
        for j in reversed(range(len(block.main))):
            g_main = _unit_backward(block.main[j], g_main, meta_lr, need_input or j > 0)
        g_short = _unit_backward(block.shortcut, g, meta_lr, need_input) if block.shortcut is not None else g
        g = g_main + g_short if need_input else None
    return g


def _conv_forward(unit: Unit, a: torch.Tensor | None, meta_lr: float, m: int) -> torch.Tensor:
    """conv(a_m, W_m) for every m, (M, B, C_out, H, W); ``a`` None: the shared trunk activation unit.x."""
    conv = unit.conv
    args = (conv.stride, conv.padding, conv.dilation)
    if unit.weight_m is not None:
        if a is None:  # one input, M weight sets: one convolution with the M sets stacked as output channels
            out = F.conv2d(unit.x, unit.weight_m.flatten(0, 1), None, *args)
            return out.unflatten(1, (m, -1)).transpose(0, 1)
        return torch.stack([F.conv2d(a[i], unit.weight_m[i], None, *args) for i in range(m)])
    b = unit.x.shape[0]
    if a is None:
        base = unit.h.detach().unsqueeze(0)  # conv(x, W): the forward already has it
        gram = torch.matmul(unit.cols, unit.cols.T)  # (L, L), shared by every m
    else:
        base = F.conv2d(a.flatten(0, 1), conv.weight, None, *args).unflatten(0, (m, b))
        patches = _im2col(conv, a.flatten(0, 1)).unflatten(0, (m, b)).flatten(1, 2)  # (M, L, K)
        gram = torch.matmul(unit.cols.to(patches.dtype), patches.transpose(1, 2))  # (M, L, L)
    low_rank = torch.matmul(unit.g_out.to(gram.dtype), gram)  # (M, C_out, L) = conv(a_m, G_m)
    low_rank = low_rank.unflatten(2, (b, *base.shape[3:])).transpose(1, 2)
    return base - meta_lr * low_rank.to(base.dtype)


def _norm_forward(unit: Unit, h: torch.Tensor) -> torch.Tensor:
    """Batch norm with each label set's own batch statistics and gamma_m, beta_m; running statistics untouched."""
    work = _statistics_precision(h)
    mean = work.mean((1, 3, 4), keepdim=True)
    inv_std = torch.rsqrt(work.var((1, 3, 4), unbiased=False, keepdim=True) + unit.norm.eps)
    y = (work - mean) * inv_std * unit.gamma_m[:, None, :, None, None] + unit.beta_m[:, None, :, None, None]
    return y.to(h.dtype)


def _unit_forward(unit: Unit, a: torch.Tensor | None, meta_lr: float, m: int) -> torch.Tensor:
    y = _norm_forward(unit, _conv_forward(unit, a, meta_lr, m))
    return F.relu(y) if unit.relu else y


def meta_forward(model: nn.Module, tape: Tape, meta_lr: float, m: int,
                 trunk_m: torch.Tensor | None = None) -> torch.Tensor:
    """F_m for every m, (B, M, D): features under theta_m (after :func:`meta_backward`).

    ``trunk_m``: the trunk activation under each theta_m, (M, B, C, H, W) (full scope); None: the
    forward's own trunk activation, shared by every m (partial scope).
    """
    a = trunk_m
    for block in tape.blocks:
        out = a
        for unit in block.main:
            out = _unit_forward(unit, out, meta_lr, m)
        if block.shortcut is not None:
            short = _unit_forward(block.shortcut, a, meta_lr, m)
        else:
            short = block.main[0].x.unsqueeze(0) if a is None else a
        a = F.relu(out + short)
    features = a.mean((3, 4))  # global average pooling, (M, B, C)
    if model.text is not None:
        w1, b1, w2, b2 = tape.text_m
        t1 = F.relu(torch.einsum("bi,moi->mbo", tape.text[0].to(w1.dtype), w1) + b1[:, None])
        t2 = F.relu(torch.einsum("mbi,moi->mbo", t1, w2) + b2[:, None])
        features = torch.cat([features, t2.to(features.dtype)], dim=2)
    return features.transpose(0, 1)


