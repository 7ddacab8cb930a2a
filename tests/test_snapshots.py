"""Snapshots of the noise stage's reference run: training.Snapshots and _pick_snapshots, alone and inside train().

train() keeps the weights at step 0, at every multiple of a stride that starts at one step, and at every evaluation
(kept only while it is the newest where it is off the stride); whenever the kept states would exceed
SNAPSHOT_BUDGET parameters, the stride of the kept states doubles (the first and the newest always kept). At the
end each snapshot fraction f gets the kept state nearest f x steps_done. References: a brute-force search over the kept
list, a freshly built model for the initial weights, and a shorter run of the same seed for the weights at a
step (training is bitwise reproducible per seed on the CPU, and a constant learning rate does not depend on
max_steps).
"""

import pytest
import torch

from batchscope.engine import runtime
from batchscope.engine import training as train_module
from batchscope.engine.training import Snapshots, _pick_snapshots, train
from batchscope.workloads.base import build
from tests.test_train import spec as train_spec

CPU = torch.device("cpu")
FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]
INTERVAL = 5


def spec(max_steps):
    """The digits MLP of tests/test_train.py, run for ``max_steps`` without stopping at the target."""
    return train_spec(max_steps=max_steps, eval_interval=INTERVAL, stop_at_target=False)


@pytest.fixture(autouse=True)
def deterministic_cpu():
    threads = torch.get_num_threads()
    runtime.setup(1, CPU)  # deterministic algorithms: bitwise reproducible runs
    yield
    torch.set_num_threads(threads)


def nearest_distance(kept, target):
    """Brute force: the smallest |step - target| over the kept states."""
    return min(abs(step - target) for step, _ in kept)


def run_with_capacity(monkeypatch, max_steps, capacity, seed=0):
    """train() with room for ``capacity`` snapshots; returns its checkpoint, the kept list _pick_snapshots saw and
    the number of thinnings."""
    params = list(build(spec(max_steps)["workload"], CPU).model.parameters())
    # a snapshot holds the weights and the optimizer's state: 1 + its slots parameter-sized tensors
    slots = runtime.make_optimizer(spec(max_steps)["optimizer"], params, 0.1).state_slots()
    monkeypatch.setattr(train_module, "SNAPSHOT_BUDGET", capacity * sum(p.numel() for p in params) * (1 + slots))
    seen, keepers = {}, []

    class Recorded(Snapshots):
        def __init__(self, *args):
            super().__init__(*args)
            keepers.append(self)

    def capturing_pick(kept, fractions, steps_done):
        seen["kept"] = list(kept)
        return _pick_snapshots(kept, fractions, steps_done)

    monkeypatch.setattr(train_module, "Snapshots", Recorded)
    monkeypatch.setattr(train_module, "_pick_snapshots", capturing_pick)
    _, checkpoint = train(spec(max_steps), 32, 0.1, seed=seed, device=CPU, snapshot_fractions=FRACTIONS)
    return checkpoint, seen["kept"], keepers[0].thinnings


@pytest.mark.parametrize("capacity", [3, 5, 6, 7])  # thinning lists of odd and of even length
def test_many_thinnings_keep_the_first_and_the_newest_state(capacity):
    """200 evaluations into a list of at most ``capacity`` states: the stride doubles several times, and the ends
    are always kept."""
    snapshots = Snapshots(capacity, INTERVAL)  # train(): room for SNAPSHOT_BUDGET // parameters states
    snapshots.add(0, {"state_dict": "initial"})
    for evaluation in range(1, 201):
        snapshots.add(INTERVAL * evaluation, {"state_dict": f"state {evaluation}"})
        kept = snapshots.kept
        assert kept[0] == (0, {"state_dict": "initial"})
        assert kept[-1] == (INTERVAL * evaluation, {"state_dict": f"state {evaluation}"})
        steps = [step for step, _ in kept]
        assert steps == sorted(set(steps)) and len(kept) <= capacity
    assert snapshots.thinnings >= 5  # the stride doubled from one evaluation to at least 32
    picked = _pick_snapshots(kept, FRACTIONS, INTERVAL * 200)
    assert [p["fraction"] for p in picked] == FRACTIONS
    assert picked[0]["step"] == 0 and picked[0]["state_dict"] == "initial"
    assert picked[-1]["step"] == 1000 and picked[-1]["state_dict"] == "state 200"
    for pick in picked:
        assert abs(pick["step"] - pick["fraction"] * 1000) == nearest_distance(kept, pick["fraction"] * 1000)
        assert (pick["step"], {"state_dict": pick["state_dict"]}) in kept


def test_training_snapshots_are_the_nearest_kept_states_with_their_weights(monkeypatch):
    """103 steps (the last block 3 steps long) with room for 6 snapshots: thinned several times; the snapshot at
    fraction 1 is the final weights (step 103), at 0 the initial ones, and every pick is the kept state nearest
    its fraction, holding the weights of a run of the same seed stopped at that step."""
    checkpoint, kept, thinnings = run_with_capacity(monkeypatch, max_steps=103, capacity=6)
    steps_done = checkpoint["steps_done"]
    assert steps_done == 103 and thinnings >= 3
    assert kept[0][0] == 0 and kept[-1][0] == steps_done and len(kept) <= 6
    snapshots = checkpoint["snapshots"]
    assert [s["fraction"] for s in snapshots] == FRACTIONS
    for snapshot in snapshots:
        target = snapshot["fraction"] * steps_done
        assert abs(snapshot["step"] - target) == nearest_distance(kept, target), snapshot["fraction"]
    final = snapshots[-1]
    assert final["step"] == steps_done
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    initial = build(spec(103)["workload"], CPU, seed=0).model.state_dict()
    assert snapshots[0]["step"] == 0
    for key, value in initial.items():
        assert torch.equal(snapshots[0]["state_dict"][key], value), key
    for snapshot in snapshots[1:-1]:
        if snapshot["step"] == 0:
            continue
        _, shorter = train(spec(snapshot["step"]), 32, 0.1, seed=0, device=CPU, snapshot_fractions=[1.0])
        for key, value in shorter["state_dict"].items():
            assert torch.equal(snapshot["state_dict"][key], value), (snapshot["step"], key)
        # and the optimizer's state there: the momentum buffers of the run stopped at that step
        (end,) = shorter["snapshots"]
        buffers = snapshot["optimizer"]["momentum_buffer"]
        assert len(buffers) == len(end["optimizer"]["momentum_buffer"]) and all(b is not None for b in buffers)
        for mine, theirs in zip(buffers, end["optimizer"]["momentum_buffer"], strict=True):
            assert torch.equal(mine, theirs), snapshot["step"]
    assert all(b is None for b in snapshots[0]["optimizer"]["momentum_buffer"])  # no update yet at step 0


def test_picks_are_within_one_regular_stride_of_their_fraction(monkeypatch):
    """200 steps, room for 6 snapshots. Halving a regular grid of the steps until it fits keeps every 2^j-th step,
    j the smallest with 200 / 2^j + 1 <= 6 (j = 6, a stride of 64 steps), and the newest; every fraction then has a
    kept state within 32 steps. Allowed here: one whole stride, 64 steps; and the kept steps are those multiples."""
    checkpoint, kept, _ = run_with_capacity(monkeypatch, max_steps=200, capacity=6)
    capacity, j = 6, 0
    while 200 / 2**j + 1 > capacity:
        j += 1
    stride = 2**j
    assert stride == 64
    assert [step for step, _ in kept] == [0, 64, 128, 192, 200]
    far = {s["fraction"]: s["step"] for s in checkpoint["snapshots"] if abs(s["step"] - s["fraction"] * 200) > stride}
    assert not far, f"picks farther than {stride} steps from their fraction: {far}; kept {[s for s, _ in kept]}"


def test_a_run_holds_at_most_two_states_per_fraction(monkeypatch):
    """Room for 1000 states, 5 fractions: the run holds at most STATES_PER_FRACTION x 5 = 10, evenly spaced (every
    32nd of 200 steps: 7 states and the newest), not a state per step."""
    assert train_module.STATES_PER_FRACTION == 2
    checkpoint, kept, thinnings = run_with_capacity(monkeypatch, max_steps=200, capacity=1000)
    steps = [step for step, _ in kept]
    assert steps == [*range(0, 200, 32), 200] and thinnings == 5


def test_a_short_run_keeps_states_between_its_evaluations():
    """A 30-step run evaluated every 10 steps: the fractions 0.25, 0.5 and 1 get three distinct states, each within
    one step of f x 30 (it keeps every second step once thinned), holding the weights of the same seed's run stopped
    there; with states kept only at evaluations 0.25 and 0.5 would both have been step 10."""
    short = train_spec(max_steps=30, eval_interval=10, stop_at_target=False)
    _, checkpoint = train(short, 32, 0.1, seed=0, device=CPU, snapshot_fractions=[0.25, 0.5, 1.0])
    steps = [s["step"] for s in checkpoint["snapshots"]]
    assert len(set(steps)) == 3 and steps[-1] == 30
    for snapshot in checkpoint["snapshots"]:
        assert abs(snapshot["step"] - snapshot["fraction"] * 30) <= 1, steps
        # evaluating does not touch the weights: the stopped run evaluates as often as its length allows
        stopped_spec = train_spec(max_steps=snapshot["step"], eval_interval=min(10, snapshot["step"]),
                                  stop_at_target=False)  # fmt: skip
        _, stopped = train(stopped_spec, 32, 0.1, seed=0, device=CPU)
        for key, value in stopped["state_dict"].items():
            assert torch.equal(snapshot["state_dict"][key], value), (snapshot["step"], key)
    assert steps[0] % 10 and steps[1] % 10  # between evaluations: with states kept only there, both were step 10


def test_out_of_memory_in_a_block_keeps_no_state_past_the_last_evaluation(monkeypatch):
    """A 40-step run evaluated every 10 steps runs out of memory at its 27th step: its record ends at step 20, and so
    do its states. Every snapshot is at or before step 20, labelled with its own step: its weights are those of the
    same seed's run stopped there (not the weights of step 26, past the record). Room for 6 states: by step 24 the
    stride is 8, so the state of step 20 (off it) gave way to 24's, which goes with the block: fraction 1 gets 16."""
    real = runtime.make_step

    def failing(*args, **kwargs):
        step, calls = real(*args, **kwargs), [0]

        def counted(x, y):
            calls[0] += 1
            if calls[0] == 27:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step(x, y)

        return counted

    monkeypatch.setattr(runtime, "make_step", failing)
    long = train_spec(max_steps=40, eval_interval=10, stop_at_target=False)
    ds, checkpoint = train(long, 32, 0.1, seed=0, device=CPU, snapshot_fractions=[0.5, 0.75, 1.0])
    assert bool(ds["out_of_memory"]) and int(ds["steps_done"]) == 20
    steps = [s["step"] for s in checkpoint["snapshots"]]
    assert steps == [8, 16, 16], steps
    monkeypatch.setattr(runtime, "make_step", real)
    for snapshot in checkpoint["snapshots"]:
        stopped_spec = train_spec(max_steps=snapshot["step"], eval_interval=min(10, snapshot["step"]),
                                  stop_at_target=False)  # fmt: skip
        _, stopped = train(stopped_spec, 32, 0.1, seed=0, device=CPU)
        for key, value in stopped["state_dict"].items():
            assert torch.equal(snapshot["state_dict"][key], value), (snapshot["step"], key)


def test_keeping_states_leaves_the_run_as_it_is():
    """The reference run stops its clock at each state it keeps; the run itself is the same, bit for bit: its
    curve of losses and metrics, its steps to the target and its final weights, with and without snapshots."""
    plain, plain_ckpt = train(spec(60), 32, 0.1, seed=1, device=CPU)
    kept, kept_ckpt = train(spec(60), 32, 0.1, seed=1, device=CPU, snapshot_fractions=FRACTIONS)
    for name in ("train_loss", "val_loss", "val_metric", "step"):
        assert (plain[name].values == kept[name].values).all(), name
    assert float(plain["steps_done"]) == float(kept["steps_done"]) == 60
    for key, value in plain_ckpt["state_dict"].items():
        assert torch.equal(kept_ckpt["state_dict"][key], value), key
    assert "snapshots" not in plain_ckpt and len({s["step"] for s in kept_ckpt["snapshots"]}) == len(FRACTIONS)


def test_too_little_room_for_the_states_to_keep_is_said(monkeypatch, caplog):
    """Room for 3 states (a model too large for SNAPSHOT_BUDGET) against 5 to keep: the run says so."""
    with caplog.at_level("WARNING", logger="batchscope"):
        run_with_capacity(monkeypatch, max_steps=30, capacity=3)
    assert "room for 3 states" in caplog.text and "fewer than the 5 to keep" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="batchscope"):
        run_with_capacity(monkeypatch, max_steps=30, capacity=6)
    assert "room for" not in caplog.text
