"""Curvature of the training loss as a linear operator, and the algorithms that take any such operator.

:class:`HessianOperator` gives H v for the mean loss over a fixed evaluation set (double backward through
``torch.autograd``, or ``torch.func``'s forward-over-reverse), summed over chunks so the set can exceed one
batch. The algorithms (:func:`lanczos`, :func:`top_eigenvalues`, :func:`hutchinson`, :func:`slq`) only see a
``matvec`` on flat vectors, so they work on any symmetric operator, a dense test matrix included. Data
loading, the model and the algorithm never live in one class.

BatchNorm is explicit: ``mode="eval"`` differentiates the network as it predicts (running statistics, as
PyHessian does silently); ``mode="train"`` the loss that SGD descended, with each chunk normalised by its own
batch statistics (and the running statistics left untouched).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import nn
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_

Matvec = Callable[[torch.Tensor], torch.Tensor]
MODES = ("eval", "train")
METHODS = ("rev_rev", "fwd_rev")
CACHE_MB = 1024  # HessianOperator's bound on kept linearisations when none is given (the stage's: hessian.cache_mb)


class Linearisation:
    """One chunk's gradient with its autograd graph kept: ``product(v)`` is H v by one backward pass of it (the graph
    is retained for the next product). ``gradient``'s graph is what keeping this object keeps alive."""

    def __init__(self, gradient: torch.Tensor, point: torch.Tensor):
        self.gradient, self.point = gradient, point

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if not self.gradient.requires_grad:  # the gradient does not depend on the point: H = 0
            return torch.zeros_like(self.point)
        # H v as the gradient of the scalar g . v: the same backward pass as passing v as grad_outputs, which makes
        # torch check its shape through the symbolic-shapes module, another 0.3 s import at a job's start
        with _differentiable():
            v = v.clone() if v.is_inference() else v  # an inference tensor cannot be saved for the backward pass
            return torch.autograd.grad(torch.dot(self.gradient, v), self.point, retain_graph=True)[0]


@contextlib.contextmanager
def _differentiable():
    """Graph recording on whatever the caller switched off (``no_grad``, ``inference_mode``), as torch.func's
    transforms do: the operator differentiates inside."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class HessianOperator:
    """H v of ``loss(model(x), y)`` averaged over the examples, with respect to all parameters (flattened).

    ``method``: ``"rev_rev"`` (the vjp of the gradient: a chunk's linearisation, built by one forward and
    backward pass, then one more backward pass per product) or ``"fwd_rev"`` (jvp of the gradient, recomputed
    per product).
    rev_rev differentiates through ``torch.autograd`` (a gradient built with ``create_graph``, then one backward
    pass of it per product) rather than ``torch.func``'s ``vjp(grad(...))``, which gives the same numbers: the
    first ``torch.func`` transform in a process imports dynamo, 1.4 s of the start of every analysis job that
    would use it, more than most of their work here.

    Memory is bounded by ``chunk_size`` and ``cache_mb``, never by the number of examples. With ``cache=True``
    (rev_rev) the linearisations of the first chunks are kept for every later product while the tensors their graphs
    saved add up to at most ``cache_mb`` megabytes (None: :data:`CACHE_MB`; counted by :func:`linearisation_bytes`);
    the other chunks rebuild theirs in each product and drop it again. A single chunk is always kept: a product
    needs its linearisation alive anyway, so keeping it costs no peak memory. Peak memory is then about ``cache_mb``
    plus one chunk's linearisation, whatever the evaluation set's size. Why a prefix in bytes rather than, say, an
    LRU of chunks: every product visits the chunks in the same order, where an LRU smaller than the chunk list never
    hits; and a byte budget means the same on any model, where a count of chunks does not (one chunk of 128 CIFAR
    images in a ResNet-20 saves ~390 MB, of the digits MLP 0.2 MB). A rebuilt product costs a forward and backward
    pass more than a kept one (1.5x the time on a ResNet-20, 1.9x on the digits MLP, 1 thread); its result is the
    same, bit for bit, as the kept one's.
    ``n_matvec`` counts products; ``benchmarks/hessian.py`` measures which method is faster, and
    ``benchmarks/memory.py`` the peak memory against the evaluation set's size.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        chunk_size: int | None = None,
        mode: str = "eval",
        method: str = "rev_rev",
        cache: bool = True,
        cache_mb: float | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if mode == "train":
            # batch statistics in every forward, running statistics neither used nor updated; on a copy, so
            # the surgery does not reach the caller's model
            self.model = copy.deepcopy(model)
            replace_all_batch_norm_modules_(self.model)
        else:
            self.model = model  # switched to eval() only around each call (_modes), then restored
        self.loss, self.mode, self.method, self.cache = loss, mode, method, cache
        self.cache_bytes = (CACHE_MB if cache_mb is None else cache_mb) * 2**20
        named = [(k, p.detach()) for k, p in self.model.named_parameters()]
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.buffers = {k: b.detach() for k, b in self.model.named_buffers()}
        self.point = torch.cat([p.reshape(-1) for _, p in named])
        self.dim = self.point.numel()
        chunk_size = chunk_size or len(x)
        self.chunks = [(x[i : i + chunk_size], y[i : i + chunk_size]) for i in range(0, len(x), chunk_size)]
        self.weights = [len(xb) / len(x) for xb, _ in self.chunks]
        self._linearised: list | None = None  # the kept linearisations, of the first len(...) chunks
        self._gradient: torch.Tensor | None = None
        self.cached_bytes = 0  # what the kept linearisations saved (0 when a single chunk is kept unmeasured)
        self.n_matvec = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.point.dtype

    @property
    def device(self) -> torch.device:
        return self.point.device

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            params[name] = flat[offset : offset + size].view(shape)
            offset += size
        return params

    def chunk_loss(self, flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with self._modes():
            out = functional_call(self.model, (self._unflatten(flat), self.buffers), (xb,))
        return self.loss(out, yb)

    @contextlib.contextmanager
    def _modes(self):
        """Every module in this operator's mode for the duration of a forward, then as the caller had it."""
        modules = list(self.model.modules())
        before = [m.training for m in modules]
        self.model.train(self.mode == "train")
        try:
            yield
        finally:
            for module, training in zip(modules, before, strict=True):
                module.training = training

    @torch.no_grad()
    def loss_value(self) -> float:
        return float(sum(w * self.chunk_loss(self.point, xb, yb) for (xb, yb), w in self._weighted()))

    def gradient(self) -> torch.Tensor:
        """The full gradient; with the rev_rev cache it comes from the pass that builds the linearisations."""
        if self.method == "rev_rev" and self.cache:
            self._build_cache()
            return self._gradient
        total = torch.zeros_like(self.point)
        for (xb, yb), w in self._weighted():
            total += w * self._chunk_gradient(xb, yb, create_graph=False)[0].detach()
        return total

    def _weighted(self):
        return zip(self.chunks, self.weights, strict=True)

    def _chunk_gradient(self, xb: torch.Tensor, yb: torch.Tensor, create_graph: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(gradient, the leaf it was taken at) of one chunk's loss at the point; with ``create_graph`` the gradient
        keeps its graph. The leaf is the point's own storage, or a copy where the point was made in inference mode;
        a loss that does not depend on the parameters has a zero gradient (without a graph)."""
        with _differentiable():
            point = (self.point.clone() if self.point.is_inference() else self.point.detach()).requires_grad_(True)
            loss = self.chunk_loss(point, xb, yb)
            gradient = None
            if loss.requires_grad:
                gradient = torch.autograd.grad(loss, point, create_graph=create_graph, allow_unused=True)[0]
        return (torch.zeros_like(self.point) if gradient is None else gradient), point

    def _linearise(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, Linearisation]:
        """(gradient, its linearisation: v -> H v) of one chunk's loss at the point."""
        gradient, point = self._chunk_gradient(xb, yb, create_graph=True)
        return gradient.detach(), Linearisation(gradient, point)

    @property
    def cached_chunks(self) -> int:
        """How many chunks' linearisations are kept (0 before the first product or gradient)."""
        return len(self._linearised or [])

    def _build_cache(self) -> None:
        """One pass over the chunks: the gradient, and the linearisations kept within ``cache_mb``."""
        if self._linearised is not None:
            return
        kept, gradient, used, room = [], torch.zeros_like(self.point), 0, True
        held = [self.point, *self.buffers.values(), *(t for chunk in self.chunks for t in chunk)]
        on_cuda = self.device.type == "cuda"
        for (xb, yb), w in self._weighted():
            before = torch.cuda.memory_allocated(self.device) if on_cuda else 0
            chunk_gradient, product = self._linearise(xb, yb)
            # on CUDA, the allocator's figure for what the build left alive where it exceeds the graph walk's count:
            # the walk rests on torch's graph internals (it once counted 0 with torch 2.11; docs/benchmarks.md, Memory)
            left_alive = torch.cuda.memory_allocated(self.device) - before if on_cuda else 0
            gradient += w * chunk_gradient.detach()
            if room and len(self.chunks) == 1:
                kept.append(product)
            elif room:
                size = linearisation_bytes(product, held)
                size = None if size is None else max(size, left_alive)
                room = size is not None and used + size <= self.cache_bytes
                if room:
                    kept.append(product)
                    used += size
            del product  # an unkept linearisation is freed here, before the next chunk's is built
        self._linearised, self._gradient, self.cached_bytes = kept, gradient, used

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(dtype=self.dtype, device=self.device)
        self.n_matvec += 1
        total = torch.zeros_like(self.point)
        if self.method == "fwd_rev":
            for (xb, yb), w in self._weighted():
                f = lambda p, xb=xb, yb=yb: self.chunk_loss(p, xb, yb)  # noqa: E731
                total += w * jvp(grad(f), (self.point,), (v,))[1]
            return total
        if self.cache:
            self._build_cache()
        kept = self._linearised or []
        for i, ((xb, yb), w) in enumerate(self._weighted()):
            # one chunk's linearisation at a time beyond the kept ones: built, applied, dropped
            product = kept[i] if i < len(kept) else self._linearise(xb, yb)[1]
            total += w * product(v)
            del product
        return total

    def dense(self) -> torch.Tensor:
        """The full matrix, one column per product (tests and tiny models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(column) for column in eye], dim=1)

    def to_scipy(self):
        """A float64 scipy ``LinearOperator`` (for ``eigsh``); products run in the model's dtype."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            out = self.matvec(torch.as_tensor(np.ravel(v)))
            return out.detach().to(torch.float64).cpu().numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, dtype=np.float64)


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return storage.device, storage.data_ptr()


def linearisation_bytes(product: Linearisation, held: Sequence[torch.Tensor] = ()) -> int | None:
    """Bytes of the distinct tensors that a :class:`Linearisation`'s autograd graph saved, leaving out the
    storages of ``held`` (the weights and the data, kept anyway): what keeping it keeps alive. None when torch's
    graph does not look as expected (then nothing beyond a single chunk is cached).

    Counted rather than measured because the CPU has no allocator statistics (on CUDA the operator also reads the
    allocator around the build and takes the larger figure). The walk reads the graph's saved tensors (``_saved_*``
    fields of its nodes): a torch release that renames them makes this count less or return None.
    """
    try:
        stack = [product.gradient.grad_fn]
    except AttributeError:
        return None
    # visited nodes kept alive: a node's Python object lives only while referenced, and a freed one's id is reused
    # by the next (torch 2.11 freed them as the walk went, which ended it after 3 nodes and a count of 0)
    seen, storages, skip = {}, {}, {_storage_key(t) for t in held}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        for name in dir(node):
            if not (name.startswith("_saved_") or name == "saved_tensors"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved tensor already freed, or a field torch cannot give back
                continue
            for tensor in value if isinstance(value, tuple | list) else (value,):
                if isinstance(tensor, torch.Tensor):
                    key = _storage_key(tensor)
                    if key not in skip:
                        storages[key] = tensor.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def dense_matvec(matrix: torch.Tensor) -> Matvec:
    """A matvec for an explicit symmetric matrix (the tests' reference operator)."""
    return lambda v: matrix @ v.to(matrix.dtype)


# ----------------------------------------------------------------------------------------------- Lanczos


@dataclass
class LanczosResult:
    ritz_values: np.ndarray  # ascending, eigenvalues of the tridiagonal matrix T
    ritz_first_components: np.ndarray  # first components of T's eigenvectors (SLQ weights are their squares)
    residual_bounds: np.ndarray  # |beta_m s_m,i|: the Ritz pair's residual norm ||H y - theta y||
    n_matvec: int
    converged: bool


def lanczos(
    matvec: Matvec,
    start: torch.Tensor,
    max_steps: int,
    *,
    k: int | None = None,
    tol: float | None = None,
) -> LanczosResult:
    """Lanczos with full reorthogonalisation, optionally stopping when the top-``k`` Ritz values converge.

    Written here rather than taken from scipy: ARPACK (``eigsh``) restarts with at least 2k+1 vectors and has
    no rule to stop on Ritz-value convergence, and stochastic Lanczos quadrature needs the tridiagonal matrix
    of a plain m-step run from a given start vector, which no scipy routine returns.

    Stopping (with ``k`` and ``tol``): each Ritz value theta_i's error is at most min(r_i, r_i^2 / gap_i),
    with r_i the residual bound and gap_i the distance to the nearest other Ritz value (Kato-Temple, the
    Ritz gap standing in for the true gap); the run stops when that is below ``tol * |theta_i|`` for the k
    largest.
    """
    q = start / torch.linalg.vector_norm(start)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    n = start.numel()
    max_steps = min(max_steps, n)
    converged = False
    beta = 0.0
    for step in range(max_steps):
        w = matvec(basis[-1])
        alpha = float(torch.dot(w, basis[-1]))
        alphas.append(alpha)
        # full reorthogonalisation, twice ("twice is enough"): keeps Ritz values free of ghost copies
        stacked = torch.stack(basis)
        for _ in range(2):
            w = w - stacked.T @ (stacked @ w)
        beta = float(torch.linalg.vector_norm(w))
        values, vectors = _tridiagonal_eigen(alphas, betas)
        bounds = np.abs(beta * vectors[-1, :])
        if k is not None and tol is not None and _top_converged(values, bounds, k, tol):
            converged = True
            break
        if step + 1 == max_steps or beta <= 1e-10 * max(1.0, np.abs(values).max()):
            converged = beta <= 1e-10 * max(1.0, np.abs(values).max())  # invariant subspace found: exact
            break
        betas.append(beta)
        basis.append(w / beta)
    return LanczosResult(values, vectors[0, :], bounds, len(alphas), converged)


def _tridiagonal_eigen(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(alphas) == 1:
        return np.array(alphas), np.ones((1, 1))
    return eigh_tridiagonal(np.asarray(alphas), np.asarray(betas[: len(alphas) - 1]))


def _top_converged(values: np.ndarray, bounds: np.ndarray, k: int, tol: float) -> bool:
    if len(values) < k + 2:  # the Ritz gap says nothing about the true gap before a few steps
        return False
    ranked = np.argsort(values)[::-1]
    order, rest = ranked[:k], ranked[k:]
    # Each Ritz interval [theta_j - r_j, theta_j + r_j] holds an eigenvalue: while a lower Ritz value's
    # interval reaches the k-th Ritz value, an eigenvalue above it may not have been found yet; keep going
    # until the top k stand clear of the rest.
    if np.max(values[rest] + bounds[rest]) >= values[order[-1]]:
        return False
    for i in order:
        gap = np.min(np.abs(np.delete(values, i) - values[i]))
        error = min(bounds[i], bounds[i] ** 2 / gap) if gap > 0 else bounds[i]
        if error > tol * max(abs(values[i]), 1e-30):
            return False
    return True


@dataclass
class TopEigenvalues:
    values: np.ndarray  # descending
    n_matvec: int
    converged: bool  # every start met its error bound and the starts agree within tol (see top_eigenvalues)


def merge_starts(runs: list[LanczosResult], k: int, tol: float) -> TopEigenvalues:
    """The top-``k`` from Lanczos runs of several start vectors: at each rank the largest Ritz value found.

    A Ritz value never exceeds the eigenvalue of its rank (Cauchy interlacing: theta_i <= lambda_i), so the
    largest over the runs is the best estimate; and an eigenvalue that one start's Krylov space has not reached
    yet (its eigenvector nearly orthogonal to that start) shows up in another's, where one run's own error bound
    cannot see it. ``converged`` holds when every run met its bound and the runs agree within ``tol``.
    """
    tops = np.stack([np.pad(np.sort(r.ritz_values)[::-1][:k], (0, max(0, k - len(r.ritz_values))),
                            constant_values=-np.inf) for r in runs])  # fmt: skip
    values = tops.max(axis=0)
    agree = bool(np.all(tops.max(axis=0) - tops.min(axis=0) <= tol * np.maximum(np.abs(values), 1e-30)))
    return TopEigenvalues(values[np.isfinite(values)], sum(r.n_matvec for r in runs),
                          all(r.converged for r in runs) and agree)  # fmt: skip


def top_eigenvalues(
    op: HessianOperator | Matvec,
    dim: int,
    k: int,
    *,
    tol: float = 1e-3,
    method: str = "lanczos",
    max_steps: int = 300,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    starts: int = 2,
) -> TopEigenvalues:
    """The ``k`` largest (algebraic) eigenvalues, by :func:`lanczos` or by scipy's ``eigsh`` (ARPACK).

    For a :class:`HessianOperator` the first start vector is the normalised gradient plus an equal-norm random
    vector: the gradient lies mostly in the top eigenspace (and comes free with the linearisation), the random
    half keeps every eigenvector in reach. On the digits MLP this took top-1 from 5-7 products to 4 and made
    top-5 find all five eigenvalues from 20 of 20 starts (19 of 20 from random ones; benchmarks/hessian.py).
    With ``starts`` > 1, Lanczos also runs from further random vectors and :func:`merge_starts` combines them:
    one run's error bound cannot see an eigenvalue its Krylov space has not reached (a check of 72 trained
    checkpoints found one run that stopped after 10 products with the 5th eigenvalue missing).
    ``dtype`` and ``device`` (of the start vectors) default to the operator's for a :class:`HessianOperator`, else
    to float32 on the CPU.
    """
    if isinstance(op, HessianOperator):
        dtype, device = dtype or op.dtype, device or op.device
    dtype, device = dtype or torch.float32, device or "cpu"
    generator = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
               for _ in range(max(starts, 1) if method == "lanczos" else 1)]  # fmt: skip
    start = vectors[0]
    matvec = op
    if isinstance(op, HessianOperator):
        matvec = op.matvec
        gradient = op.gradient().to(dtype)
        norm = float(torch.linalg.vector_norm(gradient))
        if math.isfinite(norm) and norm > 0:
            start = start / torch.linalg.vector_norm(start) + gradient / norm
    if method == "lanczos":
        runs = [lanczos(matvec, v, max_steps, k=k, tol=tol) for v in [start, *vectors[1:]]]
        return merge_starts(runs, k, tol)
    if method == "eigsh":
        from scipy.sparse.linalg import LinearOperator, eigsh  # imported here: ~0.3 s a job otherwise

        counter = {"n": 0}

        def mv(v: np.ndarray) -> np.ndarray:
            counter["n"] += 1
            out = matvec(torch.as_tensor(np.ravel(v), dtype=dtype, device=device))
            return out.detach().to(torch.float64).cpu().numpy()

        operator = LinearOperator((dim, dim), matvec=mv, dtype=np.float64)
        values = eigsh(operator, k=k, which="LA", tol=tol, v0=start.double().cpu().numpy(), maxiter=max_steps,
                       return_eigenvectors=False)  # fmt: skip
        return TopEigenvalues(np.sort(values)[::-1], counter["n"], True)
    raise ValueError(f"method must be 'lanczos' or 'eigsh', got {method!r}")


# ----------------------------------------------------------------------------------------- trace, density


@dataclass
class TraceEstimate:
    value: float
    standard_error: float
    n_matvec: int


def hutchinson(
    matvec: Matvec,
    dim: int,
    n_probes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    """tr(H) as the mean of v^T H v over Rademacher probes v, with the standard error of that mean."""
    if n_probes < 2:
        raise ValueError(f"n_probes must be at least 2 for a standard error, got {n_probes}")
    generator = torch.Generator().manual_seed(seed)
    samples = np.empty(n_probes)
    for i in range(n_probes):
        v = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(dtype=dtype, device=device)
        samples[i] = float(torch.dot(v, matvec(v)))
    return TraceEstimate(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(n_probes)), n_probes)


@dataclass
class SpectralDensity:
    nodes: np.ndarray  # (n_runs, steps): Ritz values of each run
    weights: np.ndarray  # (n_runs, steps): squared first components, each run's sum is 1
    n_matvec: int

    def grid(self, n_points: int, padding: float = 0.05) -> np.ndarray:
        low, high = np.nanmin(self.nodes), np.nanmax(self.nodes)
        width = max(high - low, 1e-12)
        return np.linspace(low - padding * width, high + padding * width, n_points)

    def density(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """Mean over runs of sum_i w_i N(t; theta_i, sigma^2); integrates to 1 over a grid that covers it."""
        nodes = self.nodes[..., None]
        kernel = np.exp(-0.5 * ((grid - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return np.nansum(self.weights[..., None] * kernel, axis=1).mean(axis=0)

    def run_first_moments(self) -> np.ndarray:
        """Per run, sum_i w_i theta_i = u^T H u for the run's unit start vector u (quadrature exact here)."""
        return np.nansum(self.nodes * self.weights, axis=1)

    def first_moment(self) -> float:
        """The mean of :meth:`run_first_moments`: an estimate of tr(H) / n."""
        return float(self.run_first_moments().mean())


def slq(
    matvec: Matvec,
    dim: int,
    n_runs: int,
    steps: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_runs`` Lanczos runs of ``steps`` steps from Gaussian start vectors.

    Each run's Ritz values are quadrature nodes and the squared first components of T's eigenvectors their
    weights, so sum_i w_i f(theta_i) estimates v^T f(H) v / |v|^2, and the average over runs tr f(H) / n.
    """
    generator = torch.Generator().manual_seed(seed)
    nodes = np.full((n_runs, steps), np.nan)
    weights = np.full((n_runs, steps), np.nan)
    total = 0
    for run in range(n_runs):
        start = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
        result = lanczos(matvec, start, steps)
        m = len(result.ritz_values)
        nodes[run, :m] = result.ritz_values
        weights[run, :m] = result.ritz_first_components**2
        total += result.n_matvec
    return SpectralDensity(nodes, weights, total)
