"""ONNX deploy (backbones.deploy.onnx): converted models exported with a dynamic batch match PyTorch in
ONNX Runtime, the static INT8 copy is really quantized and keeps the fp32 arg-max, writes are atomic,
and a missing extra is named."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import perturb_params, randomize_bn

pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install -e ".[onnx]"')
onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install -e ".[onnx]"')
pytest.importorskip("onnxscript", reason='needs the onnx extra (the dynamo exporter): pip install -e ".[onnx]"')

import backbones  # noqa: E402
from backbones import max_relative_error  # noqa: E402
from backbones.deploy import FusedConvAct, OnnxModel, check_onnx, export_onnx, quantize_int8  # noqa: E402
from backbones.deploy import onnx as onnx_deploy  # noqa: E402

# odd, non-square inputs where the model takes any size; RepMLP blocks are built for one size
SIZES = {"repmlp_res_tiny": (64, 64), "resnet_tiny": (49, 37), "repvgg_a0_tiny": (49, 37),
         "mobileone_s0_tiny": (49, 37)}
# Random-init tiny models separate their 10 classes weakly (median top-1/top-2 gap 3-14% of the
# largest logit), so 8-bit rounding flips inputs near a tie: 0.86-0.98 of 256 inputs kept their
# arg-max when written. 0.8 leaves room for other seeds; a broken quantization (wrong scales,
# ranges not calibrated) falls towards chance (0.1). Flips must be near-ties: fp32 gap under 10%.
MIN_INT8_AGREEMENT, MAX_FLIPPED_GAP = 0.8, 0.1


@pytest.fixture(scope="module", params=list(SIZES))
def exported(request, tmp_path_factory):
    """(name, trained deploy model, its fp32 file, its INT8 file, image size)."""
    name, (h, w) = request.param, SIZES[request.param]
    torch.manual_seed(0)
    model = backbones.reparameterize_model(perturb_params(randomize_bn(backbones.create(name)))).eval()
    folder = tmp_path_factory.mktemp(name)
    fp32 = export_onnx(model, torch.randn(2, 3, h, w), folder / "model.onnx")
    gen = torch.Generator().manual_seed(1)
    int8 = quantize_int8(fp32, folder / "model_int8.onnx", [torch.randn(8, 3, h, w, generator=gen) for _ in range(4)])
    return name, model, fp32, int8, (h, w)


def test_fp32_matches_the_model_at_any_batch(exported):
    name, model, fp32, _, (h, w) = exported
    if not name.startswith("repmlp"):  # the CPU fusion pass is on: the export must still see plain convs
        assert any(isinstance(m, FusedConvAct) for m in model.modules())
    graph = onnx.load(fp32).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"} and "Conv" in {n.op_type for n in graph.node}
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx", "model_int8.onnx"]  # no external data
    session = OnnxModel(fp32, threads=1)
    assert (session.precision, session.threads, session.path) == ("fp32", 1, fp32)
    assert repr(session) == f"OnnxModel(path='{fp32}', precision='fp32', threads=1)"
    for batch in (1, 3):
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            expected = model(x)
        out = session(x)
        assert out.dtype == torch.float32 and out.shape == expected.shape
        assert max_relative_error(expected, out) <= 1e-4
        assert check_onnx(model, fp32, x) <= 1e-4
    x = torch.randn(2, 3, h, w, dtype=torch.float64)  # any dtype castable to float32
    assert max_relative_error(session(x.float()), session(x)) == 0


def _per_channel_conv_weights(graph) -> tuple[int, int]:
    """(Conv nodes, those whose weight comes from a DequantizeLinear with one scale per output channel)."""
    inits = {t.name: t for t in graph.initializer}
    dequant = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    per_channel = 0
    for conv in convs:
        dq = dequant.get(conv.input[1])
        if dq is None or dq.input[0] not in inits:
            continue
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if weight.data_type == onnx.TensorProto.INT8 and axis == 0 and list(scale.dims) == [weight.dims[0]]:
            per_channel += 1
    return len(convs), per_channel


def test_int8_is_quantized_per_channel_and_keeps_the_arg_max(exported):
    _, model, _, int8, (h, w) = exported
    graph = onnx.load(int8).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    convs, per_channel = _per_channel_conv_weights(graph)
    assert convs > 0 and per_channel == convs
    session = OnnxModel(int8)
    assert session.precision == "int8"
    x = torch.randn(256, 3, h, w, generator=torch.Generator().manual_seed(2))  # drawn like the calibration
    with torch.no_grad():
        expected = model(x)
    out = session(x)
    kept = expected.argmax(1) == out.argmax(1)
    assert kept.float().mean() >= MIN_INT8_AGREEMENT
    top2 = expected.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]) / expected.abs().max()
    assert (gap[~kept] < MAX_FLIPPED_GAP).all()
    assert OnnxModel(int8, precision="fp32").precision == "fp32"  # a given name wins


def test_failed_checks_write_nothing(tmp_path, monkeypatch):
    model = backbones.create("resnet_tiny", deploy=True).eval()
    x = torch.randn(1, 3, 32, 32)
    path, int8 = tmp_path / "model.onnx", tmp_path / "model_int8.onnx"
    good = export_onnx(model, x, tmp_path / "good.onnx")
    path.write_bytes(b"earlier file")
    monkeypatch.setattr(onnx_deploy, "max_relative_error", lambda *a: 0.5)
    with pytest.raises(ValueError, match=r"model\.onnx.*0\.5.*tolerance=0\.0001"):
        export_onnx(model, x, path)
    with pytest.raises(ValueError, match=r"good\.onnx.*0\.5"):
        check_onnx(model, good, x)
    assert path.read_bytes() == b"earlier file"
    monkeypatch.undo()

    def invalid(*args, **kwargs):
        raise onnx.checker.ValidationError("forced")

    monkeypatch.setattr(onnx.checker, "check_model", invalid)
    with pytest.raises(onnx.checker.ValidationError):
        quantize_int8(good, int8, [x])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx", "model.onnx"]  # no temporary left


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_extra_is_named(tmp_path, monkeypatch, missing):
    model = backbones.create("resnet_tiny", deploy=True).eval()
    x = torch.randn(1, 3, 32, 32)
    good = export_onnx(model, x, tmp_path / "good.onnx")
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    hint = r'pip install -e "\.\[onnx\]"'
    calls = {"onnx": lambda: export_onnx(model, x, tmp_path / "m.onnx"),
             "onnxscript": lambda: export_onnx(model, x, tmp_path / "m.onnx"),
             "onnxruntime": lambda: OnnxModel(good)}
    with pytest.raises(ImportError, match=f"{missing}.*{hint}"):
        calls[missing]()
    if missing != "onnxscript":
        with pytest.raises(ImportError, match=hint):
            quantize_int8(good, tmp_path / "q.onnx", [x])
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="path=.*absent.onnx"):
        OnnxModel(tmp_path / "absent.onnx")
    with pytest.raises(FileNotFoundError, match="src=.*absent.onnx"):
        quantize_int8(tmp_path / "absent.onnx", tmp_path / "q.onnx", [])


def test_an_example_of_one_image_still_exports_a_dynamic_batch(tmp_path):
    """torch.export fixes a dimension of size 1: the exporter traces at batch 2 instead."""
    model = backbones.reparameterize_model(randomize_bn(backbones.create("resnet_tiny"))).eval()
    path = export_onnx(model, torch.randn(1, 3, 33, 31), tmp_path / "m.onnx")
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = torch.randn(3, 3, 33, 31)
    with torch.no_grad():
        assert max_relative_error(model(x), OnnxModel(path)(x)) <= 1e-4
