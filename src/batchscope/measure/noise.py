"""The gradient-noise stage: B_simple along the reference run, the variance law, and the Jensen bias.

- :func:`measure_snapshot`: per saved snapshot of the reference run, |G|^2, tr(Sigma) and B_simple over the
  evaluation set (:func:`evaluation_data`), per example (when per-example gradients are defined) and by the
  two-batch estimator.
- :func:`measure_variance`: unbiasedness and E|g_B - G|^2 against B at the reference run's final weights.
- :func:`measure_jensen_subspace`: E[H_m^-1] against H^-1 on the trained model's top Hessian eigenvectors (the
  linear-regression counterpart, with its closed form, is :mod:`batchscope.measure.jensen`).

Every pass over the evaluation set goes in chunks of ``chunk_size`` examples, so memory is bounded by the settings
(chunk_size, b_big where it is set, the Jensen minibatch sizes), not by the evaluation set's size
(``benchmarks/memory.py``).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from torch import nn

from batchscope.config import AUTO_EVAL_SIZE
from batchscope.core import hessian, noise
from batchscope.measure.jensen import jensen_dataset
from batchscope.workloads.base import TensorPair, Workload, analysis_data, evaluation_set


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _model(workload: Workload, state: dict) -> nn.Module:
    workload.model.load_state_dict(state)
    # the gradient training takes: BatchNorm in train mode (its per-example gradients are then undefined)
    return workload.model.train()


def evaluation_data(workload: Workload, spec: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples the noise and Jensen experiments work on: ``spec["eval_size"]`` of the analysis set (a fixed
    subset seeded by ``spec["seed"]``, as the Hessian stage's), or all of it when eval_size is null."""
    x, y = analysis_data(workload, device)
    return evaluation_set(x, y, spec["eval_size"], spec["seed"], "noise.eval_size")


@torch.no_grad()
def mean_loss(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """The mean loss over (x, y) in the model's current mode, one chunk of examples per forward pass."""
    return float(sum(loss(model(x[i : i + chunk]), y[i : i + chunk]) * (len(x[i : i + chunk]) / len(x))
                     for i in range(0, len(x), chunk)))  # fmt: skip


# a Hessian-vector product's cost in gradient evaluations of as many examples (double backward through the kept
# linearisation: 1.7x to 2.1x for MLPs of width 64 to 512 on this CPU), for the pairs' budget
HVP_COST = 2


def pairs_within_budget(spec: dict, run_examples: int, snapshots: int, population: int) -> tuple[int, float]:
    """The two-batch pairs per snapshot, and what all the snapshots' measurements cost as a share of the reference
    run, in example-gradients (a Hessian-vector product on the curvature's min(AUTO_EVAL_SIZE, population) examples
    counted as :data:`HVP_COST` gradients of as many).

    With ``spec["b_big"]`` null (the whole evaluation set of ``population`` examples as the big batch) a snapshot
    costs its full gradient and one HVP once, and a pair a gradient on b_small examples and one HVP; with a b_big
    below the population a pair is a gradient on each size and two HVPs. ``spec["budget"]`` x the run's
    example-gradients (``run_examples``: steps x batch size), shared by the snapshots, buys ``spec["pairs"]`` at
    most and ``spec["min_pairs"]`` at least: so on a long run the measurement stays a fraction of the run, and on
    a short one it costs what a usable B_noise needs (the quick estimate's interval says how sure that is)."""
    hvp = HVP_COST * min(AUTO_EVAL_SIZE, population)
    b_big = spec["b_big"]
    if b_big is None or b_big >= population:
        fixed, per_pair = population + hvp, spec["b_small"] + hvp
    else:
        fixed, per_pair = 0, spec["b_small"] + b_big + 2 * hvp
    pairs = spec["pairs"]
    if spec.get("budget") is not None:
        affordable = int((spec["budget"] * run_examples / snapshots - fixed) / per_pair)
        pairs = max(spec["min_pairs"], min(pairs, affordable))
    return pairs, (fixed + pairs * per_pair) * snapshots / max(run_examples, 1)


def measure_snapshot(snapshot: dict, workload: Workload, spec: dict, device: torch.device,
                     pairs: int | None = None, data: TensorPair | None = None) -> xr.Dataset:  # fmt: skip
    """Noise scale at one snapshot of ``workload.model``; ``spec`` is :func:`batchscope.stages.noise.config_slice`.
    ``pairs``: the two-batch estimator's (default ``spec["pairs"]``). ``data``: :func:`evaluation_data`, where the
    caller already holds it (the stage loads it once for every snapshot: a streamed data set reads it from disk).
    With ``spec["quick_only"]`` (the noise stage off: only the quick estimate reads it) the per-example pass over
    the evaluation set is left out."""
    pairs = spec["pairs"] if pairs is None else pairs
    model = _model(workload, snapshot["state_dict"])
    loss, chunk = workload.loss, spec["chunk_size"]
    x, y = evaluation_data(workload, spec, device) if data is None else data
    # first: the train-mode passes below move BatchNorm's running statistics
    snapshot_loss = mean_loss(model.eval(), loss, x, y, chunk)
    model.train()
    rng = np.random.default_rng(spec["seed"])
    # H of the loss the gradients descend (BatchNorm in train mode: each chunk by its own statistics), on the
    # first AUTO_EVAL_SIZE examples of the analysis set (a random subset already): an unbiased estimate of H at a
    # cost that does not grow with the data, as the Hessian stage's evaluation set; in chunks of chunk_size, so
    # that its memory is the chunk's and the operator's cache bound, not AUTO_EVAL_SIZE examples' linearisation
    xh, yh = x[:AUTO_EVAL_SIZE], y[:AUTO_EVAL_SIZE]
    curvature = hessian.HessianOperator(model, loss, xh, yh, chunk_size=chunk,
                                        mode="train" if has_batchnorm(model) else "eval")  # fmt: skip
    two = noise.two_batch_noise_scale(model, loss, x, y, spec["b_small"], spec["b_big"], pairs, rng,
                                      hvp=curvature.matvec, chunk=chunk)  # fmt: skip
    values = {"two_batch_grad_sq_norm": two.grad_sq_norm, "two_batch_trace_sigma": two.trace_sigma,
              "two_batch_b_simple": two.b_simple, "two_batch_g_h_g": two.g_h_g,
              "two_batch_trace_h_sigma": two.trace_h_sigma, "two_batch_b_noise": two.b_noise}  # fmt: skip
    batchnorm = has_batchnorm(model)
    if batchnorm or spec.get("quick_only"):
        method = "two-batch only: " + ("per-example gradients are undefined with BatchNorm in train mode" if batchnorm
                                       else "the noise stage is off (noise.enabled)")  # fmt: skip
        values.update(grad_sq_norm=np.nan, trace_sigma=np.nan, b_simple=np.nan)
    else:
        exact = noise.noise_scale(model, loss, x, y, chunk=chunk)
        method = exact.method
        values.update(grad_sq_norm=exact.grad_sq_norm, trace_sigma=exact.trace_sigma, b_simple=exact.b_simple)
    values["loss"] = snapshot_loss
    ds = xr.Dataset({name: ((), float(value)) for name, value in values.items()})
    for name in ("b_simple", "two_batch_b_simple"):
        ds[name].attrs.update(units="examples", long_name="tr(Sigma) / |G|^2")
    ds["two_batch_b_noise"].attrs.update(units="examples", long_name="tr(H Sigma) / G^T H G")
    # the two-batch estimates with the pairs resampled: how sure one snapshot's B_noise is (the quick estimate
    # carries it into b_opt's interval)
    ds["two_batch_b_noise_boot"] = ("resample", two.boot[:, 1], {"units": "examples",
                                    "long_name": "B_noise from the pairs resampled with replacement"})  # fmt: skip
    # and B_simple's, from the same resamples: the quick estimate's stand-in where G^T H G <= 0 (B_noise infinite)
    ds["two_batch_b_simple_boot"] = ("resample", two.boot[:, 0], {"units": "examples",
                                     "long_name": "B_simple from the pairs resampled with replacement"})  # fmt: skip
    ds["two_batch_b_noise_ci"] = ("bound", list(two.interval(1)), {"units": "examples",
                                  "long_name": "B_noise's 95% interval over the resampled pairs"})  # fmt: skip
    ds = ds.assign_coords(bound=["low", "high"])
    ds.attrs.update(step=int(snapshot["step"]), fraction=float(snapshot["fraction"]), method=method,
                    b_small=spec["b_small"], b_big=min(spec["b_big"] or len(x), len(x)), pairs=pairs,
                    eval_size=len(x))  # fmt: skip
    return ds


def measure_variance(state: dict, workload: Workload, spec: dict, device: torch.device,
                     data: TensorPair | None = None) -> xr.Dataset:  # fmt: skip
    """The variance law at ``state``; ``data`` as :func:`measure_snapshot`'s."""
    model = _model(workload, state)
    loss, chunk = workload.loss, spec["chunk_size"]
    x, y = evaluation_data(workload, spec, device) if data is None else data
    trace = np.nan if has_batchnorm(model) else noise.noise_scale(model, loss, x, y, chunk=chunk).trace_sigma
    law = noise.variance_law(model, loss, x, y, spec["variance_batch_sizes"], spec["variance_draws"],
                             np.random.default_rng(spec["seed"]), trace_sigma=trace, chunk=chunk)  # fmt: skip
    ds = xr.Dataset(
        {
            "mean_sq_error": ("batch_size", law.mean_sq_error, {"long_name": "E|g_B - G|^2 over the draws"}),
            "predicted": ("batch_size", law.predicted, {"long_name": "tr(Sigma) (N - B) / (B (N - 1))"}),
            "z_max": ("batch_size", law.z_max, {"long_name": "largest |mean g_B - G| / SE over coordinates"}),
            "within_3se": ("batch_size", law.within_3se, {"long_name": "share of coordinates within 3 SE"}),
            "slope": ((), law.slope, {"long_name": "log-log slope of E|g_B - G|^2 in B"}),
            "slope_ci": ("bound", list(law.slope_ci)),
            "slope_corrected": ((), law.slope_corrected, {"long_name": "the same, divided by (N - B)/(N - 1)"}),
            "slope_corrected_ci": ("bound", list(law.slope_corrected_ci)),
        },
        coords={"batch_size": law.batch_sizes.astype(int), "bound": ["low", "high"]},
    )
    ds.attrs.update(population=len(x), draws=spec["variance_draws"])
    return ds


def measure_jensen_subspace(state: dict, workload: Workload, spec: dict, device) -> xr.Dataset:
    """The trained model: the Hessian restricted to its top-k eigenvectors (Lanczos on the evaluation set,
    :func:`evaluation_data`). ``spec``: the noise.jensen settings with ``seed``, ``eval_size`` and ``chunk_size``."""
    model = workload.model
    model.load_state_dict(state)
    loss = workload.loss
    x, y = evaluation_data(workload, spec, device)
    # chunked: its memory is chunk_size's and the operator's cache bound, whatever the evaluation set's size
    full = hessian.HessianOperator(model, loss, x, y, chunk_size=spec["chunk_size"])
    k = spec["subspace_dim"]
    from scipy.sparse.linalg import eigsh

    # a seeded start vector: ARPACK's own is random, which made reruns differ in the 6th digit
    start = np.random.default_rng(spec["seed"]).standard_normal(full.dim)
    _, vectors = eigsh(full.to_scipy(), k=k, which="LA", tol=1e-6, v0=start)
    basis = torch.as_tensor(vectors, dtype=full.dtype, device=full.device)

    def restricted(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        # the whole evaluation set's is the operator above (its kept linearisations reused); a minibatch is one
        # chunk (at most the largest of subspace_sizes examples)
        op = full if xb is x else hessian.HessianOperator(model, loss, xb, yb)
        return basis.T @ torch.stack([op.matvec(basis[:, j]) for j in range(k)], dim=1)

    result = noise.jensen_subspace(restricted, x, y, spec["subspace_sizes"], spec["subspace_draws"],
                                   spec["damping"], np.random.default_rng(spec["seed"]))  # fmt: skip
    ds = jensen_dataset(result)
    ds.attrs.update(subspace="top Hessian eigenvectors (Lanczos, the evaluation set)", subspace_dim=k,
                    damping=spec["damping"], draws=spec["subspace_draws"], batchnorm_mode="eval",
                    eval_size=len(x), chunk_size=spec["chunk_size"])  # fmt: skip
    return ds
