"""tools/soak.py's measurements: its compilation count against programs compiled on purpose
(one per new program, none for a cached one), and its summary against hand-made samples. The
soak run itself (minutes) is not run here."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_tool", os.path.join(ROOT, "tools", "soak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_each_compilation_once(soak):
    recorder = soak.Recorder()
    inputs = [jnp.ones(5), jnp.zeros(5), jnp.ones(6)]  # made first: eager ops compile programs too
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    jax.monitoring.register_event_duration_secs_listener(recorder.on_duration)
    try:
        f(inputs[0])
        recorder.after_update(1)
        f(inputs[1])  # the same program, from jit's cache
        recorder.after_update(2)
        f(inputs[2])  # a new shape: compiled again
        recorder.after_update(3)
    finally:
        jax.monitoring.unregister_event_duration_listener(recorder.on_duration)
    counts = [s["compilations"] for s in recorder.updates]
    assert counts == [1, 1, 2], counts
    assert recorder.compiled[-1]["name"] == "jit(<lambda>)" and recorder.compiled[-1]["after_update"] == 2
    assert all(s["rss_mib"] > 0 for s in recorder.updates)


def test_summary_by_hand(soak):
    """6 updates, evaluations after 2 and 6 (RSS 90 and 96), a program compiled during update 4.
    Past warm-up (updates 3..6, RSS 100, 104, 102, 106) the trend is 1.6 MiB/update (least squares
    over x = 3..6: sum (x - 4.5)(y - 103) = 8, sum (x - 4.5)^2 = 5), the medians of the first and
    last 2 updates 102 and 104."""
    recorder = soak.Recorder()
    recorder.updates = [{"update": u, "rss_mib": r, "compilations": c}
                        for u, r, c in [(1, 80, 5), (2, 95, 5), (3, 100, 7), (4, 104, 8), (5, 102, 8), (6, 106, 8)]]
    recorder.evaluations = [{"update": 2, "rss_mib": 90.0, "compilations": 7},
                            {"update": 6, "rss_mib": 96.0, "compilations": 8}]
    recorder.compiled = [{"name": f"p{i}", "seconds": 0.1, "after_update": 0} for i in range(7)]
    recorder.compiled.append({"name": "late", "seconds": 0.1, "after_update": 3})
    result = soak.summary(recorder, 6, window=2)
    assert result["rss_mib_at_update"] == {"6": 106}
    assert result["first_evaluation_after_update"] == 2
    assert result["rss_growth_mib"] == 6.0
    assert result["compilations_before_first_evaluation"] == 7
    assert result["compilations_after_first_evaluation"] == 1
    assert result["compiled_after_first_evaluation"][0]["name"] == "late"
    assert result["rss_slope_mib_per_100_updates"] == pytest.approx(160.0)
    assert (result["rss_median_mib_first_window"], result["rss_median_mib_last_window"]) == (102.0, 104.0)
