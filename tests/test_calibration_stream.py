"""Issue 30 item 2: calibration streams. The batches run one at a time and each activation keeps
a seeded uniform sample of at most --calib-rows rows (calibration.sample_rows), so the
activation memory held does not grow with the number of examples; the user's batches are
checked against the model's inputs, naming the batch, the input and the shape."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import graphopt
from graphopt import calibration
from graphopt.errors import InputError

WIDE = 2048  # the exposed activation's width: [B, 64, WIDE] float32, 512 kB a row of the batch axis


def _model():
    """x -> MatMul -> Relu -> MatMul with seeded weights; 'h' is the wide activation."""
    import onnx

    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 64, 8] x, int64[N, 64] attention_mask) => (float[N, 64, 8] y, int64[N, 64] m) {
            h = MatMul(x, w1)
            a = Relu(h)
            y = MatMul(a, w2)
            m = Identity(attention_mask)
        }""")
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(rng.standard_normal((8, WIDE)).astype(np.float32), "w1"),
                                    onnx.numpy_helper.from_array(rng.standard_normal((WIDE, 8)).astype(np.float32) / 40, "w2")])
    return graphopt.load(model)


def _batch(i: int, rows: int = 4):
    rng = np.random.default_rng(100 + i)
    mask = np.ones((rows, 64), np.int64)
    mask[0, 40:] = 0
    return {"x": rng.standard_normal((rows, 64, 8)).astype(np.float32), "attention_mask": mask}


def test_a_sample_that_fits_keeps_every_row_in_order_with_exact_ranges():
    model = _model()
    batches = [_batch(i) for i in range(3)]
    seen = []
    kept = calibration.sample_rows(model, ["h"], batches, capacity=10_000, masked=True,
                                   progress=lambda i, n, what: seen.append((i, n, what)))["h"]
    full = [graphopt.verify.run(calibration.expose(model, ["h"]), b)["h"] for b in batches]
    want = np.concatenate([f.reshape(-1, WIDE)[b["attention_mask"].reshape(-1) != 0] for f, b in zip(full, batches)])
    np.testing.assert_array_equal(kept.rows, want)
    assert kept.seen == len(want) == 3 * 4 * 64 - 3 * 24
    assert kept.lo == min(f.min() for f in full) and kept.hi == max(f.max() for f in full)
    np.testing.assert_array_equal(kept.ranges, [[f.min(), f.max()] for f in full])
    np.testing.assert_array_equal(kept.first, full[0])
    assert list(np.bincount(kept.batch)) == [256 - 24] * 3
    assert seen == [(1, 3, "calibrating"), (2, 3, "calibrating"), (3, 3, "calibrating")]


def test_the_kept_rows_are_a_uniform_sample_over_every_batch():
    """With room for a tenth of the rows, each batch keeps about a tenth of its own, whatever its
    place in the stream (averaged over seeds): not the first batches only."""
    per_batch = np.zeros(10)
    for seed in range(40):
        x = [np.full((100, 3), i, np.float32) for i in range(10)]
        kept = calibration.Rows.of(x, capacity=100, seed=seed)
        assert len(kept.rows) == 100 and kept.seen == 1000
        np.testing.assert_array_equal(kept.rows[:, 0], kept.batch)  # each row's batch is recorded with it
        per_batch += np.bincount(kept.batch, minlength=10)
    assert np.all(np.abs(per_batch / 40 - 10) < 2.0), per_batch / 40


def test_activation_memory_does_not_grow_with_the_examples(monkeypatch):
    """Counting the captured arrays still alive after each batch (weak references to every
    array a run returns): sampling holds at most one batch's, for 4 batches as for 40, and its
    sample stays at --calib-rows rows; holding every batch's capture, as run_exposed does, keeps
    them all."""
    model = _model()
    returned: list[weakref.ref] = []
    real_run = calibration.verify.run

    def run(m, feeds):  # the real run; its outputs are watched, not replaced
        out = real_run(m, feeds)
        returned.extend(weakref.ref(a) for a in out.values())
        return out

    monkeypatch.setattr(calibration.verify, "run", run)

    def alive() -> int:
        gc.collect()
        return sum(r() is not None for r in returned)

    for n in (4, 40):
        returned.clear()
        held: list[int] = []
        kept = calibration.sample_rows(model, ["h"], (_batch(i) for i in range(n)), capacity=512,
                                       progress=lambda i, total, what: held.append(alive()))
        assert len(held) == n and max(held) == 0  # each batch's capture is gone before the next runs
        assert kept["h"].rows.shape == (512, WIDE) and kept["h"].seen == n * 4 * 64
    returned.clear()
    captures = calibration.run_exposed(model, ["h"], [_batch(i) for i in range(40)])
    assert alive() == 40 * 3 and len(captures) == 40  # h, y and m of every batch


def test_steps_calibrate_within_the_row_budget():
    model = _model()
    calib = [_batch(i) for i in range(8)]
    feeds = _batch(99)
    for kwargs in ({"precision": "int8"}, {"prune": "ffn"}):
        result = graphopt.optimize(model, passes=["eliminate-dead-code"], calib=calib, inputs=feeds, fidelity=0.9,
                                   calib_rows=300, **kwargs)
        assert result.report.fidelity is not None, kwargs
    with pytest.raises(InputError, match="--calib-rows must be >= 1"):
        graphopt.optimize(model, passes=["eliminate-dead-code"], calib=calib, precision="int8", calib_rows=0)


def test_batches_that_do_not_fit_name_the_batch_the_input_and_the_shape():
    model = _model()
    bad = [_batch(0), _batch(1), {"x": np.zeros((2, 64, 9), np.float32), "attention_mask": np.ones((2, 64), np.int64)}]
    with pytest.raises(InputError, match=r"'x' has shape \[2, 64, 9\], the model wants .*calibration batch 2 of 3"):
        calibration.split(model, bad)
    with pytest.raises(InputError, match="missing attention_mask.*calibration batch 0"):
        calibration.split(model, [{"x": _batch(0)["x"]}, _batch(1)])
