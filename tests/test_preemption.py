"""Stop requests (SIGTERM, SIGINT, max_hours) and the divergence guard, from the signal to the loop.

End-to-end runs (resume bit-identical after a stop at chosen points; a diverging run) are in
test_faults.py; these are the parts, each in seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multiprocess_worker import free_port
from test_train_support import LABEL_MAP, SPEC, TinyNet, batch, init_variables, random_prompt

from vpns_jax import preemption, sparsity
from vpns_jax.train import loop, steps
from vpns_jax.train.stages import TWO_PASSES, Stage, adam
from vpns_jax.train.state import all_finite, begin_stage, create_state

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = Stage('mask_finding', 2, scores=adam(0.05, 1e-2), prompt=adam(0.05, 1e-2),
              passes=TWO_PASSES, mask_mode='learned', density=0.5)
ITERS = 3


def _fresh() -> object:
    variables = init_variables(0)
    state = create_state(variables, rng=jax.random.PRNGKey(3),
                         scores=sparsity.scaled_score_init(variables['params']),
                         prompt=random_prompt(2))
    return begin_stage(STAGE, state)


class _Loader:
    """Like data.pipeline.TrainLoader: ``epoch(e, start_step=k)`` and ``len`` (ITERS batches);
    `bad` = (epoch, index) gets NaN images (a non-finite loss)."""

    def __init__(self, bad: tuple[int, int] | None):
        self.bad = bad

    def epoch(self, e: int, start_step: int = 0):
        out = [batch(100 * e + i) for i in range(ITERS)]
        if self.bad is not None and self.bad[0] == e:
            i = self.bad[1]
            out[i] = {**out[i], 'image': np.full_like(out[i]['image'], np.nan)}
        return iter(out[start_step:])

    def __len__(self) -> int:
        return ITERS


def _loaders(bad: tuple[int, int] | None = None) -> dict:
    return {'prompt': _Loader(bad), 'train': _Loader(bad)}


class _SignalAt:
    """StopRequests that sends itself `sig` (a real signal, through the real handler) before the
    `at`-th check."""

    def __init__(self, at: int, sig: int = signal.SIGTERM):
        self.at, self.sig, self.stops = at, sig, preemption.StopRequests()
        self.calls = 0

    def check(self) -> str | None:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return self.stops.check()


def _run(stops=None, bad=None, on_nonfinite='stop', start=(0, 0)):
    saved = []
    step_fn = steps.make_train_step(STAGE, TinyNet(), SPEC,
                                    skip_nonfinite=on_nonfinite == 'skip_batch')
    hooks = [lambda end: saved.append(('epoch_hook', end.epoch)) and None]
    state, result = loop.run_stage(
        STAGE, _fresh(), TinyNet(), _loaders(bad), prompt_spec=SPEC,
        label_map=jnp.asarray(LABEL_MAP), hooks=hooks, log_every=0, step_fn=step_fn,
        stops=stops, stop_hook=lambda end: saved.append(('stop', end.epoch, end.iteration,
                                                         int(end.state.step))),
        on_nonfinite=on_nonfinite, start_epoch=start[0], start_iteration=start[1])
    return state, result, saved


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_saves_after_that_iteration_and_stops(sig):
    # what was installed before (SIGINT is SIG_IGN in a process started in the background)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stops = _SignalAt(2, sig)
    with stops.stops, pytest.raises(preemption.Stopped, match=signal.Signals(sig).name):
        assert signal.getsignal(sig) is not before[sig]  # our handler is in place
        _run(stops)
    # checked after iteration 2 of epoch 0: the state after 2 iterations is saved as (0, 2)
    assert stops.calls == 2
    # the handlers are back as they were
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_at_an_epochs_last_iteration_saves_after_the_epoch_hooks():
    stops = _SignalAt(ITERS)
    saved = []
    with stops.stops, pytest.raises(preemption.Stopped):
        loop.run_stage(STAGE, _fresh(), TinyNet(), _loaders(), prompt_spec=SPEC,
                       label_map=jnp.asarray(LABEL_MAP), log_every=0,
                       hooks=[lambda end: saved.append(('hook', end.epoch)) and None],
                       stops=stops, stop_hook=lambda end: saved.append(
                           ('stop', end.epoch, end.iteration, int(end.state.step))))
    assert saved == [('hook', 0), ('stop', 1, 0, ITERS)]


def test_stop_hook_gets_the_position_and_state_of_the_stop():
    stops = _SignalAt(ITERS + 1)  # first iteration of epoch 1
    saved = []
    with stops.stops, pytest.raises(preemption.Stopped):
        loop.run_stage(STAGE, _fresh(), TinyNet(), _loaders(), prompt_spec=SPEC,
                       label_map=jnp.asarray(LABEL_MAP), log_every=0, stops=stops,
                       stop_hook=lambda end: saved.append((end.epoch, end.iteration,
                                                           int(end.state.step))))
    assert saved == [(1, 1, ITERS + 1)]


def test_max_hours_is_a_stop_request_when_the_budget_is_spent():
    now = [0.0]
    stops = preemption.StopRequests(max_hours=0.5, clock=lambda: now[0])
    assert stops.check() is None
    now[0] = 0.5 * 3600 - 1
    assert stops.check() is None
    now[0] = 0.5 * 3600
    assert 'config.max_hours = 0.5' in stops.check()


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\n"
            "from vpns_jax import preemption\n"
            "with preemption.StopRequests() as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert s.check() == 'SIGTERM received'\n"
            "    print('first handled', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "    print('still running', flush=True)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert 'first handled' in out.stdout and 'still running' not in out.stdout
    assert 'again: exiting at once' in out.stderr


def test_two_processes_stop_at_the_same_iteration():
    """SIGINT on process 1 only: JAX's preemption service spreads it and both stop together."""
    port = str(free_port())
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': os.path.dirname(HERE)}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, 'preemption_worker.py'), str(i),
                               port, '20' if i == 1 else '-1'], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    lines = [o[0].strip().splitlines()[-1] if o[0].strip() else o[1][-2000:] for o in outs]
    assert all(p.returncode == 0 for p in procs), lines
    stopped = [line.split(':')[0] for line in lines]
    assert stopped[0] == stopped[1] and stopped[0].startswith('stopped at '), lines
    assert int(stopped[0].split()[-1]) > 20  # after the signal, at the step the service agreed on
    assert 'SIGINT received' in lines[1]


def test_a_non_finite_loss_stops_at_the_iteration_that_made_it():
    with pytest.raises(loop.NonFinite) as err:
        _run(bad=(1, 1))
    assert (err.value.epoch, err.value.iteration) == (1, 2)  # epoch 1's second iteration
    assert 'pass0/loss nan' in str(err.value)


def test_a_non_finite_loss_in_an_epochs_last_iteration_is_caught_before_its_hooks():
    saved = []
    with pytest.raises(loop.NonFinite) as err:
        loop.run_stage(STAGE, _fresh(), TinyNet(), _loaders(bad=(0, ITERS - 1)), prompt_spec=SPEC,
                       label_map=jnp.asarray(LABEL_MAP), log_every=0,
                       hooks=[lambda end: saved.append(end.epoch) and None])
    assert (err.value.epoch, err.value.iteration) == (0, ITERS) and saved == []


def test_skip_batch_drops_the_update_of_a_non_finite_iteration():
    step = steps.make_train_step(STAGE, TinyNet(), SPEC, skip_nonfinite=True)
    factors = {'params': 1.0, 'scores': 1.0, 'prompt': 1.0}
    good = {'prompt': batch(1), 'train': batch(1)}
    bad_image = np.full_like(batch(2)['image'], np.nan)
    bad = {'prompt': {**batch(2), 'image': bad_image}, 'train': {**batch(2), 'image': bad_image}}
    state = _fresh()
    before = jax.device_get(state)
    state, metrics = step(state, bad, jnp.asarray(LABEL_MAP), factors)
    assert float(metrics['skipped']) == 1.0 and bool(all_finite(state))
    after = jax.device_get(state)
    for name in ('params', 'scores', 'prompt', 'batch_stats', 'opt_state'):
        for a, b in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name)),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(after.step) == int(before.step) + 1
    state, metrics = step(state, good, jnp.asarray(LABEL_MAP), factors)
    assert float(metrics['skipped']) == 0.0
    # a good batch updates as the plain step does (another compiled program: the last bits move)
    plain = steps.make_train_step(STAGE, TinyNet(), SPEC)
    ref, _ = plain(jax.device_put(jax.tree.map(np.asarray, after)), good, jnp.asarray(LABEL_MAP),
                   factors)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(ref)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(after.scores[next(iter(after.scores))],
                              jax.device_get(state).scores[next(iter(after.scores))])


def test_skip_batch_run_counts_skips_and_ends_finite():
    state, result, _ = _run(bad=(1, 1), on_nonfinite='skip_batch')
    assert result.metrics['skipped'] == 1.0 and bool(all_finite(state))
    assert np.isfinite(result.metrics['pass0/loss'])  # the mean over the iterations kept


def test_all_finite():
    assert bool(all_finite({'a': jnp.ones(3), 'b': jnp.arange(3)}))
    assert not bool(all_finite({'a': jnp.array([1.0, jnp.inf])}))
    assert not bool(all_finite([jnp.zeros(2), jnp.array([jnp.nan])]))
    assert bool(all_finite({}))
