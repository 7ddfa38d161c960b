"""AutoClip and ZClip behaviour beyond the float64 references in test_parity.py."""

import jax.numpy as jnp
import numpy as np

import gradxform as gx


def norms_through(tx, norms):
    state = tx.init(jnp.zeros(1))
    out = []
    for n in norms:
        u, state = tx.update(jnp.array([n]), state)
        out.append(float(u[0]))
    return out, state


def test_autoclip_ring_buffer_forgets_old_norms_and_ignores_nonfinite():
    # Clipping only scales down, so the window is seen through norms that rise: the first 100
    # is cut to the median of [1, 1, 100]; three 100s later the 1s are gone (with all six
    # norms in the window the median would be 50.5).
    out, state = norms_through(
        gx.autoclip(percentile=50.0, history=3), [1.0, 1.0, 1.0, 100.0, 100.0, 100.0]
    )
    assert out[3] == 1.0
    assert out[-1] == 100.0 and float(state.record.threshold) == 100.0
    out, state = norms_through(gx.autoclip(percentile=100.0, history=4), [2.0, np.nan, 3.0])
    assert int(state.written) == 2 and float(state.record.threshold) == 3.0


def test_zclip_caps_blowups_during_warmup_by_default():
    out, _ = norms_through(gx.zclip(), [0.5, 50.0])
    assert out == [0.5, 1.0]  # max_norm=1.0 cap, even inside warm-up
    out, _ = norms_through(gx.zclip(max_norm=None), [0.5, 50.0])
    assert out == [0.5, 50.0]


def test_zclip_moments_absorb_the_clipped_norm_not_the_spike():
    warm = [1.0, 1.2, 0.8, 1.1, 0.9] * 5
    _, state = norms_through(gx.zclip(warmup_steps=25, max_norm=None), [*warm, 1000.0])
    assert bool(state.record.clipped)
    assert float(state.moments.mean) < 1.2  # a 1000 absorbed raw would move it past 30
