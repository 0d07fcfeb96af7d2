"""Issue 16: large models with the weights held once. The wire-format split of a single
file, the streamed save of large tensors, the unmapping of replaced weights, and a model over
2 GB optimized end to end with every step checked. Memory and time are measured in
benchmarks/big_model.py, not here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest

import graphopt
from graphopt import exporters, importers, protowire, verify
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.steps import Stage


def rich_model() -> onnx.ModelProto:
    """Every part of a model a split must keep: large and small initializers of several dtypes
    (one with a doc string), a Constant node's tensor, a model-local function, metadata."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    big_half = rng.standard_normal((64, 64)).astype(np.float16)
    idx = np.arange(512, dtype=np.int64)
    small = np.array([1.5, -2.0], np.float32)
    inits = [nh.from_array(w, "W"), nh.from_array(big_half, "H"), nh.from_array(idx, "idx"), nh.from_array(small, "s")]
    inits[0].doc_string = "the weight"
    fn = oh.make_function("local", "Twice", ["a"], ["b"], [oh.make_node("Add", ["a", "a"], ["b"])],
                          [oh.make_opsetid("", 17)])
    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["m"]),
        oh.make_node("Cast", ["H"], ["hf"], to=onnx.TensorProto.FLOAT),
        oh.make_node("MatMul", ["m", "hf"], ["m2"]),
        oh.make_node("Constant", [], ["c"], value=nh.from_array(rng.standard_normal(64).astype(np.float32))),
        oh.make_node("Add", ["m2", "c"], ["a"]),
        oh.make_node("Twice", ["a"], ["t"], domain="local"),
        oh.make_node("Mod", ["idx", "sixty_four"], ["idx_mod"]),
        oh.make_node("Gather", ["t", "idx_mod"], ["g"], axis=1),
        oh.make_node("Mul", ["g", "s0"], ["y"]),
    ]
    inits += [nh.from_array(np.float32(small[0]), "s0"), nh.from_array(np.int64(64), "sixty_four")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", 1, [2, 64])],
                          [oh.make_tensor_value_info("y", 1, [2, 512])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local", 1)],
                          functions=[fn], ir_version=8)
    oh.set_model_props(model, {"author": "graphopt tests"})
    model.doc_string = "a model to split"
    onnx.checker.check_model(model)
    return model


def test_the_wire_split_keeps_every_field_and_moves_the_large_tensors(tmp_path):
    proto = rich_model()
    src = tmp_path / "single.onnx"
    onnx.save(proto, src)
    target = tmp_path / "split" / "model.onnx"
    target.parent.mkdir()
    assert protowire.split(src, target, location="weights.data", threshold=1024)
    got = onnx.load(target, load_external_data=False)
    moved = {t.name for t in got.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert moved == {"W", "H", "idx"}  # 16 KiB, 8 KiB, 4 KiB; "s" and the scalars stay inline
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in got.graph.initializer if t.name in moved]
    assert all(o % protowire.ALIGNMENT == 0 for o in offsets)
    onnx.load_external_data_for_model(got, str(target.parent))
    for t in got.graph.initializer:
        t.ClearField("data_location")
    assert {t.name: nh.to_array(t).tobytes() for t in got.graph.initializer} == \
        {t.name: nh.to_array(t).tobytes() for t in proto.graph.initializer}
    assert [t.doc_string for t in got.graph.initializer if t.name == "W"] == ["the weight"]
    for field in ("node", "input", "output"):
        assert [x.SerializeToString() for x in getattr(got.graph, field)] == \
            [x.SerializeToString() for x in getattr(proto.graph, field)]
    assert [f.SerializeToString() for f in got.functions] == [f.SerializeToString() for f in proto.functions]
    assert (got.ir_version, list(got.opset_import), got.doc_string, list(got.metadata_props)) == \
        (proto.ir_version, list(proto.opset_import), proto.doc_string, list(proto.metadata_props))
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(verify.run(graphopt.load(target), {"x": x})["y"],
                                  verify.run(graphopt.load(proto), {"x": x})["y"])


def test_the_wire_split_declines_external_data_and_rejects_a_broken_file(tmp_path, monkeypatch):
    proto = rich_model()
    saved = graphopt.save(graphopt.load(proto), tmp_path / "ext" / "m.onnx", external_data=True)
    assert not protowire.split(saved, tmp_path / "ext-split.onnx", location="w.data")  # already external
    assert not (tmp_path / "ext-split.onnx").exists()
    src = tmp_path / "single.onnx"
    onnx.save(proto, src)
    data = src.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError):
        protowire.split(truncated, tmp_path / "t-split.onnx", location="w.data")
    monkeypatch.setattr(importers, "SPLIT_BYTES", 1024)  # graphopt.load takes the split path for these files
    with pytest.raises(InputError, match="not a readable ONNX model"):
        graphopt.load(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 4096)
    with pytest.raises(InputError, match="not a readable ONNX model"):
        graphopt.load(garbage)
    model = graphopt.load(saved)  # external data already: loaded as it is
    assert model.external_files() == {saved.with_name("m.onnx.data").resolve()}


@pytest.mark.parametrize("external_source", [False, True])
def test_a_streamed_save_writes_large_tensors_of_every_dtype_exactly(tmp_path, external_source):
    """Tensors over exporters.STREAMED_BYTES have their raw bytes written straight from the
    array or file to file; every dtype, packed 4-bit included, parses back to the same tensor."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((64, 64)).astype(np.float32),
              "f16": rng.standard_normal((64, 64)).astype(np.float16),
              "bf16": rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16),
              "i8": rng.integers(-128, 127, (64, 64)).astype(np.int8),
              "i4": rng.integers(-8, 7, (128, 64)).astype(ml_dtypes.int4),
              "b": rng.integers(0, 2, (64, 128)).astype(bool)}
    graph = ir.Graph([], [], nodes=[], name="g", opset_imports={"": 21})
    for name, array in arrays.items():
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        graph.register_initializer(value)
        graph.outputs.append(value)
    model = graphopt.load(ir.Model(graph, ir_version=10))
    if external_source:
        model = graphopt.load(graphopt.save(model, tmp_path / "src" / "ext.onnx", external_data=True))
        assert len(model.external_files()) == 1
    out = graphopt.save(model, tmp_path / "inline.onnx")
    got = {t.name: t for t in onnx.load(out).graph.initializer}
    want = {t.name: t for t in exporters.to_proto(model).graph.initializer}
    assert {n: t.SerializeToString() for n, t in got.items()} == {n: t.SerializeToString() for n, t in want.items()}
    for name, array in arrays.items():
        back = ir.serde.deserialize_tensor(got[name]).numpy()
        np.testing.assert_array_equal(back.astype(np.float32), array.astype(np.float32))


def test_replaced_weights_are_unmapped_and_live_ones_map_again(tmp_path):
    proto = rich_model()
    model = graphopt.load(graphopt.save(graphopt.load(proto), tmp_path / "m.onnx", external_data=True))
    stage = Stage(model, None, None, mapped=graphopt.model.mapped_tensors(model.ir))
    tensors = {t.name: t for t in stage.mapped}
    w, h = model.ir.graph.initializers["W"], model.ir.graph.initializers["H"]
    before = w.const_value.numpy().copy()
    for t in stage.mapped:
        t.numpy()  # mapped, as a check maps them
    w.const_value = ir.tensor(before * 2, name="W")  # a rewrite replaced W's tensor
    held = h.const_value.numpy()  # a view someone still holds keeps its map
    stage.unmap(live=False)
    assert tensors["W"].raw is None and tensors["idx"].raw is not None and tensors["H"].raw is not None
    stage.unmap()
    assert tensors["idx"].raw is None and tensors["H"].raw is not None  # H is viewed: its map stays
    del held
    stage.unmap()
    assert tensors["H"].raw is None
    np.testing.assert_array_equal(tensors["W"].numpy(), before)  # a closed map opens again on a read
    np.testing.assert_array_equal(tensors["H"].numpy(), nh.to_array(proto.graph.initializer[1]))


ROWS, COLS, BLOCKS = 8192, 12288, 3  # 6 weights of 384 MiB: 2.25 GiB


def gelu_blocks(directory):
    """x -> BLOCKS x (x + MatMul(Gelu(MatMul(x, W1)), W2)), Gelu written out as exporters do
    (x * 0.5 * (1 + erf(x / sqrt 2))) and an Identity per block: 2.25 GiB of weights written
    in chunks to one external file, so building it needs little memory."""
    rng = np.random.default_rng(0)
    data = directory / "big.onnx.data"
    inits, nodes, offset = [], [], 0
    with open(data, "wb") as f:
        for i in range(BLOCKS):
            for name, (rows, cols) in ((f"w1_{i}", (ROWS, COLS)), (f"w2_{i}", (COLS, ROWS))):
                for start in range(0, rows, 2048):
                    f.write((rng.standard_normal((min(2048, rows - start), cols), np.float32) / np.sqrt(rows)).tobytes())
                t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[rows, cols],
                                     data_location=onnx.TensorProto.EXTERNAL)
                for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
                    t.external_data.add(key=k, value=v)
                inits.append(t)
                offset += rows * cols * 4
            h = f"h{i}" if i else "x"
            nodes += [oh.make_node("MatMul", [h, f"w1_{i}"], [f"a{i}"]),
                      oh.make_node("Div", [f"a{i}", "sqrt2"], [f"d{i}"]), oh.make_node("Erf", [f"d{i}"], [f"e{i}"]),
                      oh.make_node("Add", [f"e{i}", "one"], [f"p{i}"]), oh.make_node("Mul", [f"a{i}", f"p{i}"], [f"q{i}"]),
                      oh.make_node("Mul", [f"q{i}", "half"], [f"g{i}"]), oh.make_node("Identity", [f"g{i}"], [f"gi{i}"]),
                      oh.make_node("MatMul", [f"gi{i}", f"w2_{i}"], [f"b{i}"]),
                      oh.make_node("Add", [h, f"b{i}"], [f"h{i + 1}" if i < BLOCKS - 1 else "y"])]
    inits += [nh.from_array(np.array(v, np.float32), n) for n, v in (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5))]
    graph = oh.make_graph(nodes, "gelu-blocks", [oh.make_tensor_value_info("x", 1, ["batch", ROWS])],
                          [oh.make_tensor_value_info("y", 1, ["batch", ROWS])], inits)
    path = directory / "big.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_a_model_over_2gb_optimizes_end_to_end_with_every_step_checked(tmp_path):
    """Issue 16: load (mapped external data), the exact preset with each step checked in
    onnxruntime, the final validation, the save (external data: over the protobuf limit), and
    the saved model validated against the input."""
    path = gelu_blocks(tmp_path)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) > 2**31
    result = graphopt.optimize(path, preset="exact", dims={"batch": 2})
    applied = {s.name: {r: n for r, n in s.rewrites.items() if n} for s in result.report.steps if s.status == "applied"}
    # constant folding takes the Identity nodes (before eliminate-identity sees them)
    assert applied == {"fold-constants": {"FoldConstants": BLOCKS}, "fuse-activations": {"FuseGelu": BLOCKS}}
    assert all(s.check and s.check["passed"] for s in result.report.steps if s.status == "applied")
    assert result.report.validation.passed
    out = graphopt.save(result.model, tmp_path / "out" / "big.opt.onnx")
    assert (tmp_path / "out" / "big.opt.onnx.data").stat().st_size >= 6 * ROWS * COLS * 4
    again = graphopt.load(out)
    assert graphopt.inspect(again)["op_counts"].get("Identity", 0) == 0
    assert graphopt.validate(path, again, dims={"batch": 2}).passed


def test_a_merge_releases_the_weights_it_replaced_as_it_goes(tmp_path):
    """merge-parallel-linears gives back each old projection's mapped pages right after its
    merge (passes/_weights.release_if_unused), so the pass holds about one layer's old weights
    at a time; the merged model computes the same."""
    from graphopt import registry

    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((64, 32)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [oh.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]) for i in range(3)]
    nodes += [oh.make_node("Add", ["m0", "m1"], ["s"]), oh.make_node("Add", ["s", "m2"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", 1, [2, 64])],
                          [oh.make_tensor_value_info("y", 1, [2, 32])], inits)
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model = graphopt.load(graphopt.save(graphopt.load(proto), tmp_path / "m.onnx", external_data=True))
    old = [model.ir.graph.initializers[f"w{i}"].const_value for i in range(3)]
    assert all(isinstance(t, ir.ExternalTensor) for t in old)
    for t in old:
        t.numpy()
    assert registry.get("merge-parallel-linears")(model.ir) == {"MergeParallelLinears": 1}
    assert all(t.raw is None for t in old)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(verify.run(model, {"x": x})["y"], verify.run(graphopt.load(proto), {"x": x})["y"],
                               rtol=1e-5, atol=1e-6)
