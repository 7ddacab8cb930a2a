"""Per-example squared gradient norms in one forward and one backward pass, without per-example gradients.

tr(Sigma) = N/(N-1) (mean_n |g_n|^2 - |G|^2) needs only |g_n|^2, the squared norm of example n's gradient. For
the layer types below it is a function of what a layer sees in one batched pass: its input a (recorded by a
forward hook) and the gradient delta of the loss with respect to its output. The loss is a mean over the batch,
so N x the loss is the sum of the examples' losses and row n of every delta is example n's own.

- ``nn.Linear`` on inputs (N, *, I): with T = the positions per example (the product of the middle dimensions,
  1 for plain (N, I) inputs), example n's weight gradient is sum_t delta_nt a_nt^T. Its squared norm is computed
  the cheapest of three ways (see :func:`_outer_sq_norms`): |a_n|^2 |delta_n|^2 when T = 1 (rank one); the
  explicit O x I matrix per example; or the "ghost norm" Gram identity sum_{t,s} (a_t . a_s)(delta_t . delta_s).
  The bias gradient is sum_t delta_nt. Attention built from ``nn.Linear`` layers (GPT-style q/k/v/out
  projections and MLPs on (N, T, D)) is covered this way.
- ``nn.Conv1d`` / ``nn.Conv2d``: the weight gradient is delta_n (Cout x L) @ unfold(a_n)^T (L x Cin k), a Linear
  layer over the L output positions, with the same choice: explicit (computed by the convolution's own weight
  gradient kernel with the examples as extra groups, which never materialises unfold(a): 6x faster than
  unfold + bmm on CPU for ResNet-20's first stage) or Gram (on the unfolded input). Stride, padding (any
  padding_mode, "same"), dilation and groups are handled (per group, a block of the unfolded input against a
  block of the output channels).
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and BatchNorm (1d/2d/3d and the project's Ghost
  BatchNorm) in eval mode: the affine weight's gradient is sum over positions of delta * x_hat, the bias's the
  sum of delta. x_hat is recomputed from the recorded input with the layer's own statistics (not recovered from
  the output, which fails where a weight is 0).
- ``nn.Embedding``: sum over a vocabulary row v of the deltas of the positions that looked v up; squared norm
  by scattering into rows or by the Gram identity masked to equal indices, whichever is cheaper.

BatchNorm in train mode normalises each example by statistics of the whole batch: the examples' gradients are
coupled and per-example gradients are undefined, so :func:`sq_norms` raises ValueError (the noise stage then
uses only its two-batch estimator). A module with parameters of any other type (``nn.MultiheadAttention``,
whose in_proj weight belongs to no submodule; Conv3d; a custom module with its own parameters; a
parametrisation) makes :func:`supported` False, and the caller falls back to ``vmap(grad)``.

Assumptions: nothing but BatchNorm in train mode (refused) mixes examples in the forward pass (``vmap(grad)``
assumes the same); dimension 0 of every hooked layer's input and output is the example dimension, as in the model's
input (checked: a layer that sees another leading size raises :class:`Unsupported`; a sequence-first layout
whose sequence length happens to equal N cannot be told apart). A layer used several times in one forward pass
(shared weights) is handled: its calls' gradients are summed (or their positions pooled) before the norm. Only
parameters that require gradients are counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn import functional

from batchscope.core.ghost import GhostBatchNorm1d, GhostBatchNorm2d

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# at most this many elements in one intermediate per layer (explicit matrices, Gram matrices, unfolded inputs):
# larger batches are processed in chunks of examples
BUDGET = 2**25

_LINEAR = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_CONV = (nn.Conv1d, nn.Conv2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, GhostBatchNorm1d, GhostBatchNorm2d)
_RMSNORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_NORM = (nn.LayerNorm, nn.GroupNorm, *_RMSNORM, *_BATCHNORM)


class Unsupported(ValueError):
    """The model has a layer this module cannot treat (the caller may fall back to vmap(grad))."""


def _own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _own_parameters(m)]


def _why_not(module: nn.Module) -> str | None:
    """None when ``module`` is supported, else the reason. Exact types: a subclass may change ``forward``."""
    kind = type(module)
    if kind not in (*_LINEAR, *_CONV, *_NORM, nn.Embedding):
        return f"no per-example rule for {kind.__name__}"
    if not set(_own_parameters(module)) <= {"weight", "bias"}:
        return f"{kind.__name__} has parameters besides weight and bias"
    if kind is nn.Embedding and (module.max_norm is not None or module.scale_grad_by_freq):
        return "nn.Embedding with max_norm or scale_grad_by_freq (both depend on the whole batch)"
    return None


def supported(model: nn.Module) -> bool:
    """Whether every module of ``model`` with parameters of its own has a one-pass rule here (BatchNorm counts as
    supported: :func:`sq_norms` then still refuses it in train mode)."""
    layers = _layers(model)
    return bool(layers) and all(_why_not(m) is None for m in layers)


def _check_batchnorm(module: nn.Module) -> None:
    """Any BatchNorm, with parameters or not (affine=False still couples the examples' earlier gradients)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
        raise ValueError(
            f"{type(module).__name__} in train mode (or without running statistics) normalises each example by "
            "statistics of the whole batch: per-example gradients are undefined (put the model in eval mode, or "
            "use the two-batch estimator)"
        )


def _chunks(n: int, per_example: int) -> list[slice]:
    step = max(1, BUDGET // max(1, per_example))
    return [slice(i, i + step) for i in range(0, n, step)]


def _outer_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|sum_t d[n, g, :, t] a[n, g, :, t]^T|^2 summed over groups g: a (N, G, I, T), d (N, G, O, T) -> (N,).

    Cost rule (multiply-adds per example and group): explicit O x I matrix d a^T: T I O (memory I O);
    Gram identity sum_{t,s} (a_t . a_s)(d_t . d_s): T^2 (I + O) (memory T^2). The Gram route wins when
    T (I + O) < I O: long sequences through narrow layers go explicit, short sequences through wide layers (most
    Linear layers on sequences) go Gram. T = 1 is the rank-one case |a|^2 |d|^2, cost I + O.
    """
    n, groups, i, t = a.shape
    o = d.shape[2]
    if t == 1:
        return ((a.squeeze(3) ** 2).sum(2) * (d.squeeze(3) ** 2).sum(2)).sum(1)
    gram = t * (i + o) < i * o
    per = groups * (t * t if gram else i * o)
    out = []
    for rows in _chunks(n, per):
        ar, dr = a[rows], d[rows]
        if gram:
            out.append(((ar.transpose(2, 3) @ ar) * (dr.transpose(2, 3) @ dr)).sum((1, 2, 3)))
        else:
            out.append(((dr @ ar.transpose(2, 3)) ** 2).sum((1, 2, 3)))
    return torch.cat(out)


def _linear_pieces(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, I, T) input and (N, 1, O, T) output gradient, T the positions per example (1 for (N, I) inputs)."""
    n = x.shape[0]
    return (x.reshape(n, -1, x.shape[-1]).transpose(1, 2).unsqueeze(1),
            g.reshape(n, -1, g.shape[-1]).transpose(1, 2).unsqueeze(1))  # fmt: skip


def _padded(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
    """The input and the padding left for the convolution: zero padding as the layer's own, other modes and the
    (possibly asymmetric) "same" padded explicitly, as the layer's forward pads."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, module.padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return functional.pad(x, module._reversed_padding_repeated_twice, mode=mode), 0


def _conv_pieces(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G, Cin/G k, L) unfolded input and (N, G, Cout/G, L) output gradient (the Gram route)."""
    n, groups = x.shape[0], module.groups
    x, padding = _padded(module, x)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):  # unfold is 2-d only: a 1 x L image
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
        padding = (0, *padding) if isinstance(padding, tuple) else 0
    cols = functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, Cin k, L)
    return cols.reshape(n, groups, -1, cols.shape[-1]), g.reshape(n, groups, module.out_channels // groups, -1)


def _conv_weight_grads(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(N, Cout Cin/G k) per-example weight gradients (the explicit route): the weight gradient of the same
    convolution with the examples as further groups (input (1, N Cin, ...), groups N G), so it is one call of the
    convolution's own backward kernel and no unfolded copy of the input is made."""
    n = x.shape[0]
    x, padding = _padded(module, x)
    weight_grad = torch.nn.grad.conv2d_weight if isinstance(module, nn.Conv2d) else torch.nn.grad.conv1d_weight
    size = (n * module.out_channels, *module.weight.shape[1:])
    per_example = weight_grad(x.reshape(1, -1, *x.shape[2:]), size, g.reshape(1, -1, *g.shape[2:]), module.stride,
                              padding, module.dilation, n * module.groups)  # fmt: skip
    return per_example.reshape(n, -1)


def _outer_layer(module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Linear and Conv. A layer called several times: its per-example gradient sums over the calls, so the
    explicit route sums the calls' matrices and the Gram route pools their positions."""
    n = calls[0][0].shape[0]
    conv = isinstance(module, _CONV)
    if conv:  # per group: I = Cin/G k inputs, O = Cout/G outputs, T = output positions (over all calls)
        groups, i, o = module.groups, module.weight[0].numel(), module.out_channels // module.groups
        t = sum(g[0, 0].numel() for _, g in calls)
    else:
        groups, (o, i) = 1, module.weight.shape
        t = sum(g[0].numel() // o for _, g in calls)
    total = torch.zeros(n, dtype=calls[0][1].dtype, device=calls[0][1].device)
    if module.bias is not None and module.bias.requires_grad:
        c = module.bias.numel()
        sums = (g.reshape(n, c, -1).sum(2) if conv else g.reshape(n, -1, c).sum(1) for _, g in calls)
        total += (sum(sums) ** 2).sum(1)
    if not module.weight.requires_grad:
        return total
    if conv and not (t > 1 and t * (i + o) < i * o):  # explicit (the rule of _outer_sq_norms)
        for rows in _chunks(n, groups * i * o):
            total[rows] += (sum(_conv_weight_grads(module, x[rows], g[rows]) for x, g in calls) ** 2).sum(1)
        return total
    pieces = _conv_pieces if conv else _linear_pieces
    kernel = math.prod(module.kernel_size) if conv else 1
    for rows in _chunks(n, sum(x[0].numel() * kernel + g[0].numel() for x, g in calls)):
        a, d = zip(*(pieces(module, x[rows], g[rows]) for x, g in calls), strict=True)
        a, d = (a[0], d[0]) if len(calls) == 1 else (torch.cat(a, 3), torch.cat(d, 3))
        total[rows] += _outer_sq_norms(a, d)
    return total


def _x_hat(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The normalised input, before the affine transform, with the layer's own statistics."""
    if isinstance(module, nn.LayerNorm):
        return functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return functional.group_norm(x, module.num_groups, eps=module.eps)
    if isinstance(module, _RMSNORM):
        return functional.rms_norm(x, module.normalized_shape, eps=module.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)  # BatchNorm in eval mode: the running statistics, channels at dim 1
    return (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)


def _norm_layer(module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-example affine gradients, (N, features): summed over positions and over calls, then squared."""
    n = calls[0][0].shape[0]
    weight, bias = module.weight, getattr(module, "bias", None)  # RMSNorm has no bias
    if isinstance(module, (nn.LayerNorm, *_RMSNORM)):  # features last: (N, ..., *normalized_shape)
        k = math.prod(module.normalized_shape)

        def per_feature(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, k).sum(1)
    else:  # GroupNorm, BatchNorm: channels at dim 1, (N, C, ...)

        def per_feature(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, t.shape[1], -1).sum(2)

    total = torch.zeros(n, dtype=calls[0][1].dtype, device=calls[0][1].device)
    if weight is not None and weight.requires_grad:
        total += (sum(per_feature(g * _x_hat(module, x)) for x, g in calls) ** 2).sum(1)
    if bias is not None and bias.requires_grad:
        total += (sum(per_feature(g) for _, g in calls) ** 2).sum(1)
    return total


def _embedding_layer(module: nn.Embedding, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Row v of example n's gradient is the sum of the deltas of its positions that looked v up. Cost rule per
    example (T positions, V rows, D features): scatter into a V x D matrix, T D + V D; Gram identity restricted to
    equal indices, T^2 D. The Gram route wins when T^2 < V (few positions, a large vocabulary)."""
    n = calls[0][0].shape[0]
    if not module.weight.requires_grad:
        return torch.zeros(n, dtype=calls[0][1].dtype, device=calls[0][1].device)
    idx = torch.cat([x.reshape(n, -1) for x, _ in calls], 1)
    d = torch.cat([g.reshape(n, -1, module.embedding_dim) for _, g in calls], 1)
    if module.padding_idx is not None:  # the padding row gets no gradient
        d = d * (idx != module.padding_idx).unsqueeze(2)
    t, v = idx.shape[1], module.num_embeddings
    gram = t * t < v
    out = []
    for rows in _chunks(n, t * t if gram else v * module.embedding_dim):
        i, dr = idx[rows], d[rows]
        if gram:
            out.append(((dr @ dr.transpose(1, 2)) * (i.unsqueeze(2) == i.unsqueeze(1))).sum((1, 2)))
        else:
            m = len(i)
            flat = (i + v * torch.arange(m, device=i.device).unsqueeze(1)).reshape(-1)
            table = torch.zeros(m * v, module.embedding_dim, dtype=dr.dtype, device=dr.device)
            table.index_add_(0, flat, dr.reshape(-1, module.embedding_dim))
            out.append((table.view(m, -1) ** 2).sum(1))
    return torch.cat(out)


def _contribution(module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    if isinstance(module, (*_LINEAR, *_CONV)):
        return _outer_layer(module, calls)
    if isinstance(module, nn.Embedding):
        return _embedding_layer(module, calls)
    return _norm_layer(module, calls)


def sq_norms(model: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) squared norms of the per-example gradients of ``loss(model(x), y)`` (a mean over the batch) with
    respect to all parameters that require gradients, from one forward and one backward pass.

    The backward pass asks autograd only for the gradients with respect to the hooked layers' outputs (edges
    captured when each output is made, so a later in-place change such as ``ReLU(inplace=True)`` does not
    matter), so no parameter's batch gradient is computed or accumulated. Raises :class:`Unsupported` for a model
    :func:`supported` rejects or a layer without the example dimension first, ValueError for BatchNorm in train
    mode. Hooks are removed and the parameters' ``.grad`` set to None afterwards, whatever happens.
    """
    layers = _layers(model)
    for module in layers:
        if (reason := _why_not(module)) is not None:
            raise Unsupported(f"per-example norms in one pass: {reason}")
    for module in model.modules():
        _check_batchnorm(module)
    n = len(x)
    inputs: dict[nn.Module, list[tuple[torch.Tensor, int]]] = {m: [] for m in layers}
    edges: list[tuple[nn.Module, int, object]] = []

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        a = args[0]
        if a.shape[0] != n or output.shape[0] != n:
            raise Unsupported(
                f"{type(module).__name__} saw a leading dimension of {a.shape[0]} (input) / {output.shape[0]} "
                f"(output) for a batch of {n}: per-example norms by hooks need the example dimension first"
            )
        if not output.requires_grad:  # under no_grad, or nothing below it trains
            return
        inputs[module].append((a.detach(), a._version))
        edges.append((module, len(inputs[module]) - 1, get_gradient_edge(output)))

    handles = [module.register_forward_hook(record) for module in layers]
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            # N x the mean loss is the sum over examples, so each output gradient's row n is example n's own
            total_loss = loss(model(x), y) * n
        for handle in handles:
            handle.remove()
        if not edges:
            raise ValueError("no layer with parameters that require gradients was reached by the forward pass")
        grads = torch.autograd.grad(total_loss, [edge for *_, edge in edges], allow_unused=True)
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (module, k, _), g in zip(edges, grads, strict=True):
            a, version = inputs[module][k]
            if g is None:  # this output did not reach the loss: no contribution
                continue
            if a._version != version:
                raise ValueError(f"the input of a {type(module).__name__} was modified in place after the layer")
            calls.setdefault(module, []).append((a, g))
        del grads
        inputs.clear()
        total = torch.zeros(n, dtype=total_loss.dtype, device=total_loss.device)
        for module in list(calls):
            total += _contribution(module, calls.pop(module))
        return total
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
