"""Import and export: every source kind, IR version for ORT, external data, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.parser
import pytest

import graphopt
from graphopt import sessions as ort_backend
from graphopt.ir import ir

MLP = """
<ir_version: 10, opset_import: ["" : 21]>
mlp (float[N, 64] x) => (float[N, 64] y) <float[64, 64] w1, float[64, 64] w2> {
    h = MatMul(x, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


def mlp_proto(seed: int = 0) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(MLP)
    rng = np.random.default_rng(seed)
    proto.graph.initializer.extend(
        onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), name) for name in ("w1", "w2")
    )
    return proto


def test_load_every_source_kind(tmp):
    proto = mlp_proto()
    path = tmp / "mlp.onnx"
    onnx.save(proto, path)
    from_path = graphopt.load(path)
    assert from_path.source == path.resolve()
    for source in (proto, ir.serde.deserialize_model(proto), from_path, str(path)):
        model = graphopt.load(source)
        assert graphopt.inspect(model)["op_counts"] == {"MatMul": 2, "Relu": 1}
        assert graphopt.validate(proto, model).passed


def test_save_writes_an_ir_version_ort_loads(tmp):
    proto = mlp_proto()
    proto.ir_version = onnx.IR_VERSION  # 14 with onnx 1.23, which ORT 1.31 rejects
    out = graphopt.save(graphopt.load(proto), tmp / "out.onnx")
    assert onnx.load(out).ir_version == min(onnx.IR_VERSION, ort_backend.max_ir_version())
    ort_backend.session(str(out))  # loads


def test_external_data_round_trip(tmp):
    model = graphopt.load(mlp_proto())
    out = graphopt.save(model, tmp / "ext.onnx", external_data=True)
    assert (tmp / "ext.onnx.data").stat().st_size == 2 * 64 * 64 * 4
    assert os.path.getsize(out) < 4096
    loaded = graphopt.load(out)
    assert loaded.external_files() == {(tmp / "ext.onnx.data").resolve()}
    # Copying elsewhere carries the data along.
    again = graphopt.save(loaded, tmp / "sub" / "copy.onnx", external_data=True)
    assert graphopt.validate(model, again).passed
    assert graphopt.validate(model, graphopt.save(loaded, tmp / "inline.onnx")).passed
    assert not (tmp / "inline.onnx.data").exists()


def test_save_leaves_no_temporary_files(tmp):
    graphopt.save(graphopt.load(mlp_proto()), tmp / "a.onnx", external_data=True)
    assert sorted(p.name for p in tmp.iterdir()) == ["a.onnx", "a.onnx.data"]


def test_refuses_to_overwrite_source_unless_forced(tmp):
    path = tmp / "m.onnx"
    onnx.save(mlp_proto(), path)
    before = path.read_bytes()
    model = graphopt.load(path)
    with pytest.raises(graphopt.InputError, match="refusing to overwrite"):
        graphopt.save(model, path)
    assert path.read_bytes() == before
    graphopt.save(model, path, force=True)
    assert graphopt.validate(mlp_proto(), path).passed


def test_force_overwrite_of_external_source_keeps_weights(tmp):
    path = graphopt.save(graphopt.load(mlp_proto()), tmp / "m.onnx", external_data=True)
    model = graphopt.load(path)
    graphopt.save(model, path, external_data=True, force=True)
    assert graphopt.validate(mlp_proto(), path).passed


def test_failed_save_leaves_target_untouched(tmp, monkeypatch):
    path = tmp / "keep.onnx"
    path.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    from graphopt import exporters

    monkeypatch.setattr(exporters, "_write_streamed", boom)  # the write itself fails; ORT is not involved
    with pytest.raises(OSError):
        graphopt.save(graphopt.load(mlp_proto()), path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp.iterdir()] == ["keep.onnx"]


def test_unknown_domain_lists_every_op():
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21, "acme" : 1]>
    g (float[2] x) => (float[2] y) {
        a = acme.Frobnicate(x)
        b = acme.Twiddle(a)
        y = Relu(b)
    }
    """)
    with pytest.raises(graphopt.UnsupportedModelError) as info:
        graphopt.load(proto)
    assert "acme::Frobnicate" in str(info.value) and "acme::Twiddle" in str(info.value)


def test_unknown_standard_op():
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2])], [onnx.helper.make_tensor_value_info("y", 1, [2])]))
    with pytest.raises(graphopt.UnsupportedModelError, match="NoSuchOp"):
        graphopt.load(proto)


def test_local_functions_are_supported():
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21, "graphopt" : 1]>
    g (float[2] x) => (float[2] y) { y = graphopt.Double(x) }
    <domain: "graphopt", opset_import: ["" : 21]>
    Double (a) => (b) { b = Add(a, a) }
    """)
    model = graphopt.load(proto)
    from graphopt import verify
    out = verify.run(model, {"x": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(out["y"], [2.0, 4.0])


def test_a_large_single_file_model_holds_its_weights_in_a_mapped_file(tmp, monkeypatch):
    """Issue 16, item 1: over importers.SPLIT_BYTES (256 MiB; lowered here), a single-file
    model's weights move to a temporary external-data file, memory-mapped; the model computes
    the same and saves complete."""
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    from graphopt import importers, verify
    from graphopt.ir import ir

    monkeypatch.setattr(importers, "SPLIT_BYTES", 1 << 20)
    w = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"])], "g", [oh.make_tensor_value_info("x", 1, [2, 1024])],
                          [oh.make_tensor_value_info("y", 1, [2, 512])], [nh.from_array(w, "W")])
    path = tmp / "single.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), path)
    model = graphopt.load(path)
    tensor = model.ir.graph.initializers["W"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and "graphopt-weights-" in str(tensor.base_dir)
    x = np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)
    np.testing.assert_allclose(verify.run(model, {"x": x})["y"], x @ w, rtol=1e-5, atol=1e-4)
    out = graphopt.save(model, tmp / "out" / "saved.onnx")
    again = onnx.load(out)
    np.testing.assert_array_equal(nh.to_array(again.graph.initializer[0], base_dir=str(out.parent)), w)


@pytest.mark.parametrize("external_source", [False, True])
def test_inline_save_streams_the_same_model(tmp, external_source):
    """Issue 16: an inline save writes the initializers one at a time into the ModelProto's
    graph; the file parses to the same nodes, inputs, outputs and tensors as onnx's own
    serialization of the model (from mapped external data too), and passes the checker."""
    from graphopt import exporters

    model = graphopt.load(mlp_proto(3))
    if external_source:
        model = graphopt.load(graphopt.save(model, tmp / "src" / "ext.onnx", external_data=True))
        assert model.external_files()
    out = graphopt.save(model, tmp / "inline.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    got, want = onnx.load(out), exporters.to_proto(model)
    assert not (tmp / "inline.onnx.data").exists()
    assert {t.name: t.SerializeToString() for t in got.graph.initializer} == \
        {t.name: t.SerializeToString() for t in want.graph.initializer}
    for field in ("node", "input", "output"):
        assert [x.SerializeToString() for x in getattr(got.graph, field)] == \
            [x.SerializeToString() for x in getattr(want.graph, field)]
    assert (got.ir_version, list(got.opset_import)) == (want.ir_version, list(want.opset_import))
    assert graphopt.validate(model, graphopt.load(out)).passed
