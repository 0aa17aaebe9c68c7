"""train/loop.py driven directly (tests/train/conftest.py builds the run in this process): what one update changes,
EMA's step, gradient accumulation, the non-finite skip, the stop at max_train_steps and on a signal."""

import os
import signal

import pytest
import torch

from sadm_finetune.train.checkpointing import TrainState
from sadm_finetune.train.loop import apply_update, train_loop


def snapshot(params):
    return [p.detach().clone() for p in params]


def count_steps(optimizer):
    """Count the optimizer's real steps (accelerate's wrapper around it calls the wrapped one's `step`)."""
    calls = []
    optimizer.optimizer.register_step_post_hook(lambda *_: calls.append(1))
    return calls


def test_one_update_moves_the_trainable_weights_and_ema_by_its_decay(make_run):
    r = make_run(max_train_steps=2, use_ema=True, ema_decay=0.1)
    run = r.run
    params = run.ema_parameters()
    assert params and run.ema is not None and run.ema.decay == 0.1
    weights = [snapshot(params)]
    shadows = []
    frozen = {n: p.detach().clone() for n, p in r.adapter.vae.named_parameters()}
    state, seen = TrainState(), []

    def on_update(s):
        seen.append(s.global_step)
        weights.append(snapshot(params))
        shadows.append(snapshot(run.ema.shadow_params))

    assert train_loop(run, r.dataloader, r.dataset, state, on_update) is False
    assert (state.global_step, state.epoch, state.batches_in_epoch) == (2, 0, 2) and seen == [1, 2]
    assert all(not torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # every trainable tensor moved
    assert all(torch.equal(p, frozen[n]) for n, p in r.adapter.vae.named_parameters())  # the VAE did not
    # diffusers' EMAModel: decay 0 at its first step (the shadow becomes the weights), then
    # min(ema_decay, (1 + s) / (10 + s)) = min(0.1, 2 / 11) = 0.1 at the second
    assert all(torch.equal(s, w) for s, w in zip(shadows[0], weights[1]))
    for shadow, w1, w2 in zip(shadows[1], weights[1], weights[2]):
        torch.testing.assert_close(shadow, 0.1 * w1 + 0.9 * w2, rtol=1e-5, atol=1e-7)
    assert run.ema.optimization_step == 2


def test_gradient_accumulation_updates_once_per_n_micro_batches(make_run):
    r = make_run(max_train_steps=2, gradient_accumulation_steps=2, structure_weight=0.0, use_ema=False)
    steps = count_steps(r.run.optimizer)
    forwards = []
    predict = r.adapter.predict
    r.adapter.predict = lambda *a, **k: forwards.append(1) or predict(*a, **k)
    state, seen = TrainState(), []
    train_loop(r.run, r.dataloader, r.dataset, state, lambda s: seen.append(s.global_step))
    assert len(forwards) == 4 and len(steps) == 2 and seen == [1, 2]
    assert (state.global_step, state.epoch, state.batches_in_epoch) == (2, 0, 4)
    assert r.run.lr_scheduler.scheduler.last_epoch == 2  # the LR schedule advanced once per update


def test_a_non_finite_loss_skips_the_update_and_is_counted(make_run):
    r = make_run(max_train_steps=3, structure_weight=0.0, use_ema=True)
    run = r.run
    steps = count_steps(run.optimizer)
    real_loss, calls = run.diffusion_loss, []

    def nan_on_second(*args):
        calls.append(1)
        per_sample = real_loss(*args)
        return per_sample * float("nan") if len(calls) == 2 else per_sample

    run.diffusion_loss = nan_on_second
    weights, ema_weights, counters = [], [], []

    def on_update(s):
        weights.append(snapshot(run.ema_parameters()))
        ema_weights.append(snapshot(run.ema.shadow_params))
        counters.append((s.global_step, s.nonfinite_in_a_row, s.nonfinite_total))

    train_loop(run, r.dataloader, r.dataset, TrainState(), on_update)
    # step 2's update is skipped (no optimizer step, no EMA step) but counts as a step; step 3's resets the streak
    assert counters == [(1, 0, 0), (2, 1, 1), (3, 0, 1)]
    assert len(steps) == 2 and run.ema.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert all(torch.equal(a, b) for a, b in zip(ema_weights[0], ema_weights[1]))
    assert not any(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert all(p.grad is None for p in run.trainable_parameters)  # zeroed after the skip as after a step


def test_apply_update_refuses_a_non_finite_gradient_and_clips_a_finite_one(make_run):
    r = make_run(max_train_steps=1, structure_weight=0.0, use_ema=False)
    run, acc = r.run, r.accelerator
    params = run.trainable_parameters
    before = snapshot(params)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    result = apply_update(acc, run.optimizer, run.lr_scheduler, torch.tensor(1.0), params, 1.0)
    assert (result.applied, result.hard_failure) == (False, True)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(params))) and all(p.grad is None for p in params)
    assert run.lr_scheduler.scheduler.last_epoch == 0
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    result = apply_update(acc, run.optimizer, run.lr_scheduler, torch.tensor(1.0), params, 1.0)
    n = sum(p.numel() for p in params)
    assert (result.applied, result.hard_failure) == (True, False)
    torch.testing.assert_close(result.grad_norm, torch.tensor(3.0 * n ** 0.5))  # the norm before clipping
    assert run.lr_scheduler.scheduler.last_epoch == 1
    assert not any(torch.equal(a, b) for a, b in zip(before, snapshot(params)))


def test_the_loop_stops_at_max_train_steps_across_epochs_and_resumes_where_it_left(make_run):
    r = make_run(max_train_steps=6, structure_weight=0.0, use_ema=False)  # 4 batches an epoch
    state, seen = TrainState(), []
    assert train_loop(r.run, r.dataloader, r.dataset, state, lambda s: seen.append((s.epoch, s.global_step))) is False
    assert seen == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6)]
    assert (state.global_step, state.epoch, state.batches_in_epoch) == (6, 1, 2)
    steps = count_steps(r.run.optimizer)
    train_loop(r.run, r.dataloader, r.dataset, state, lambda s: seen.append(s))  # already at max_train_steps
    assert steps == [] and len(seen) == 6


def test_a_signal_stops_the_loop_after_the_current_update(make_run):
    r = make_run(max_train_steps=5, structure_weight=0.0, use_ema=False)
    handler = signal.getsignal(signal.SIGTERM)
    state = TrainState()

    def on_update(s):
        if s.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train_loop(r.run, r.dataloader, r.dataset, state, on_update) is True
    assert state.global_step == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back


@pytest.mark.parametrize("sadm", [True, False])
def test_the_logged_values_per_update(make_run, monkeypatch, sadm):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None:
                        logged.append((step, values)))
    r = make_run(max_train_steps=2, use_ema=False, **({} if sadm else {"structure_weight": 0.0}))
    train_loop(r.run, r.dataloader, r.dataset, TrainState(), lambda s: None)
    assert [step for step, _ in logged] == [1, 2]
    values = logged[0][1]
    expected = {"loss_diffusion", "loss_vlb", "grad_norm_g", "lr", "nonfinite_updates"}
    if sadm:
        expected |= {"nonfinite_discriminator_updates"}
    assert expected <= set(values) and ("nonfinite_discriminator_updates" in values) == sadm
    assert all(isinstance(v, float) for v in values.values())  # one host copy: no tensors reach the trackers
    assert values["nonfinite_updates"] == 0.0
    # the LR after each update: the default cosine schedule over 2 steps (no warm-up at 5% of 2) from 1e-3
    assert [v["lr"] for _, v in logged] == pytest.approx([5e-4, 0.0])
