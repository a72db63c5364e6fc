"""The `cpu` target: ONNX Runtime INT8 on the tiny trained ViT, real quantization, real onnxruntime."""

import json

import numpy as np
import onnx
import pytest
from _backend_agreement import assert_same_grades_where_clear_cut, clear_cut

from edgeretina.bundle import load_bundle
from edgeretina.dataset import read_labels
from edgeretina.errors import ConfigError, GateError
from edgeretina.export import ExportConfig, export
from edgeretina.export.quantize_ort import (FLOAT_SCOPES, Candidate, OrtInt8Options, _choose,
                                           calibration_method, calibration_ranges, describe_calibration,
                                           near_threshold_count, quantize_int8, schemes_for)
from edgeretina.runtime.grader import Grader

QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear"}


@pytest.fixture(scope="module")
def cpu_bundle(tiny_checkpoint, phantom_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles-cpu") / "tiny-cpu"
    return export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, target="cpu",
                               reference_images=phantom_test, reference_count=8, calibration_count=16),
                  log=lambda _: None)


def test_manifest_records_int8_and_the_scheme_choice(cpu_bundle):
    m = load_bundle(cpu_bundle).manifest
    model = next(a for a in m.artifacts if a.file == "model.onnx")
    assert model.precision == "int8" and model.target == "cpu"
    quant = m.export["quantization"]
    assert set(quant["candidates"]) == {"dynamic", "static", "dynamic-u8"}
    chosen = quant["candidates"][quant["scheme"]]
    assert chosen["passed_gate_thresholds"] is True
    passing = [c for c in quant["candidates"].values() if c["passed_gate_thresholds"]]
    assert chosen["median_ms_1thread"] == min(c["median_ms_1thread"] for c in passing)
    assert quant["reason"] and isinstance(quant["cpu"]["flags"], list)
    assert m.export["calibration"]["count"] == 16
    assert m.export["gate"]["onnx-int8"]["passed"] is True
    assert quant["kept_float"]["scopes"] == list(FLOAT_SCOPES)
    assert quant["calibration_method"] == {"method": "MinMax"}      # the fixture is a ViT: "auto" keeps MinMax
    near = quant["near_threshold"]
    assert near["of"] == 8 and 0 <= near["images"] <= 8


def _int8_weights(bundle) -> list[np.ndarray]:
    from onnx import numpy_helper

    graph = onnx.load(str(bundle / "model.onnx")).graph
    return [numpy_helper.to_array(t).astype(np.int32) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]


def test_the_shipped_int8_artifact_is_valid_on_every_cpu_class(cpu_bundle):
    """Whichever scheme the timing picks, its integers do not depend on the ISA (7-bit signed or uint8 weights)."""
    portability = load_bundle(cpu_bundle).manifest.export["quantization"]["portability"]
    assert {"x86-avx2", "x86-avx512", "x86-avx512-vnni", "x86-amx"} <= set(portability["valid_cpu_classes"])


def test_signed_int8_weights_use_seven_bits(tiny_checkpoint, phantom_test, tmp_path):
    out = export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "static", target="cpu",
                              precision="int8-static", reference_images=phantom_test, reference_count=8,
                              calibration_count=16), log=lambda _: None)
    weights = _int8_weights(out)
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64      # 7-bit: no int16 saturation on AVX2
    portability = load_bundle(out).manifest.export["quantization"]["portability"]
    assert portability["weight_bits"] == 7 and "x86-avx2" in portability["valid_cpu_classes"]
    assert load_bundle(out).manifest.export["gate"]["onnx-int8"]["passed"] is True   # gated in fail mode


def test_eight_bit_weights_are_declared_valid_only_where_they_cannot_saturate(tiny_checkpoint, phantom_test, tmp_path):
    out = export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "eight", target="cpu",
                              precision="int8-dynamic", int8_weight_bits=8, reference_images=phantom_test,
                              reference_count=8, gate="warn"), log=lambda _: None)
    assert max(int(np.abs(w).max()) for w in _int8_weights(out)) > 64          # the full range is used
    manifest = load_bundle(out).manifest
    valid = manifest.export["quantization"]["portability"]["valid_cpu_classes"]
    assert "x86-avx2" not in valid and "x86-avx512-vnni" in valid
    # warn mode: on AVX2 the 8-bit weights saturate int16 pair sums, so the gate's margin depends on the CPU
    # class (x86-avx2: embedding cosine 0.990 vs 0.98 needed); the outcome is recorded either way
    gate = manifest.export["gate"]["onnx-int8"]
    assert gate["mode"] == "warn" and gate["passed"] == all(c["passed"] for c in gate["checks"].values())
    assert gate["checks"]["embedding_cosine"]["value"] > 0.95
    with pytest.raises(ConfigError, match="int8_weight_bits"):
        ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "x", int8_weight_bits=6)


def test_unsigned_weight_scheme_keeps_8_bits_and_is_valid_everywhere(tiny_checkpoint, phantom_test, tmp_path):
    from onnx import numpy_helper

    out = export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "u8", target="cpu",
                              precision="int8-dynamic-u8", reference_images=phantom_test, reference_count=8),
                 log=lambda _: None)
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert weights and max(int(w.max()) for w in weights) > 128      # the whole uint8 range, not 7 bits
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in graph.node}   # convolutions quantized too
    manifest = load_bundle(out).manifest
    quant = manifest.export["quantization"]
    assert quant["scheme"] == "dynamic-u8" and quant["portability"]["weights"] == "uint8"
    assert "x86-avx2" in quant["portability"]["valid_cpu_classes"]
    assert manifest.export["runtime"]["onnxruntime"] == {"one_image_per_run": True}
    assert manifest.export["gate"]["onnx-int8"]["passed"] is True      # gated in fail mode


@pytest.fixture(scope="module")
def dynamic_bundle(tiny_checkpoint, phantom_test, tmp_path_factory):
    """The dynamic scheme alone, gated in fail mode (x86-avx2: embedding cosine 0.9998 vs 0.98 needed)."""
    out = tmp_path_factory.mktemp("bundles-cpu-dynamic") / "dyn"
    return export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, target="cpu",
                               precision="int8-dynamic", reference_images=phantom_test, reference_count=8),
                  log=lambda _: None)


def test_a_dynamic_int8_result_does_not_depend_on_the_photos_batched_with_it(dynamic_bundle):
    """DynamicQuantizeLinear takes one range over the whole batch; the bundle's runner runs photos one by one."""
    from edgeretina.preprocess import PreprocessConfig, normalize
    from edgeretina.reference_set import load_reference_set

    out = dynamic_bundle
    assert load_bundle(out).manifest.export["gate"]["onnx-int8"]["passed"] is True
    grader = Grader(out, threads=1)
    inputs = normalize(load_reference_set(out / "reference.npz").inputs_u8,
                       PreprocessConfig.from_dict(grader.bundle.manifest.model["preprocess"]))
    alone = grader.runner.run(inputs[:1])["ordinal_logits"]
    dark_neighbour = np.concatenate([inputs[:1], inputs[1:2] * 0.0 - 3.0])   # a batch-mate with other ranges
    np.testing.assert_array_equal(grader.runner.run(dark_neighbour)["ordinal_logits"][:1], alone)


def test_static_ranges_are_percentile_for_resnet_towers_and_minmax_otherwise():
    from types import SimpleNamespace

    def ctx(kind):
        return SimpleNamespace(checkpoint=SimpleNamespace(model=SimpleNamespace(backbone=SimpleNamespace(kind=kind))))

    assert calibration_method(ctx("resnet"), OrtInt8Options()) == "percentile"
    assert calibration_method(ctx("vit"), OrtInt8Options()) == "minmax"
    assert calibration_method(ctx("timm"), OrtInt8Options()) == "minmax"                # not measured there
    assert calibration_method(ctx("vit"), OrtInt8Options(calibration="percentile")) == "percentile"
    assert describe_calibration(ctx("resnet"), OrtInt8Options()) == {
        "method": "Percentile", "percentile": 99.999, "symmetric": False, "histogram_bins": 2048, "chunk_images": 32,
        "minmax_scopes": ["/attnpool/"]}


def test_percentile_ranges_are_collected_chunk_by_chunk(onnx_bundle, tmp_path, monkeypatch):
    """ORT's histogram calibrater holds every intermediate output of one collect_data call (gigabytes for
    ViT-B-16 x 256 images): each call must see one chunk only and leave nothing held; histograms merge."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCalibrater

    images_per_call, held_after_call = [], []
    collect = HistogramCalibrater.collect_data

    def counting_collect(self, reader):
        get_next, seen = reader.get_next, []

        def counting_get_next():
            feed = get_next()
            if feed is not None:
                seen.append(len(feed["image"]))
            return feed

        reader.get_next = counting_get_next
        collect(self, reader)
        images_per_call.append(sum(seen))
        held_after_call.append(len(self.intermediate_outputs))

    monkeypatch.setattr(HistogramCalibrater, "collect_data", counting_collect)
    images = np.random.default_rng(0).normal(size=(20, 3, 64, 64)).astype(np.float32)
    ranges = calibration_ranges(onnx_bundle / "model.onnx", images, OrtInt8Options(calibration_chunk=8), tmp_path)
    assert images_per_call == [8, 8, 4] and held_after_call == [0, 0, 0]
    assert ranges.calibration_method == CalibrationMethod.Percentile
    low, high = (float(v) for v in ranges["image"].range_value)
    assert images.min() <= low < 0 < high <= images.max() and low != -high       # asymmetric, all 20 images
    assert len(list(ranges.keys())) > 10


def test_minmax_scopes_keep_minmax_ranges_for_the_tensors_they_name(onnx_bundle, tmp_path):
    """The attention pool forms the embedding: its tensors keep MinMax ranges under percentile calibration."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from edgeretina.export.graph import CalibrationReader

    model = onnx_bundle / "model.onnx"
    images = np.random.default_rng(1).normal(size=(12, 3, 64, 64)).astype(np.float32)
    plain = calibration_ranges(model, images, OrtInt8Options(calibration_chunk=6, minmax_scopes=()), tmp_path)
    names = sorted(plain.data)
    named = names[len(names) // 2]
    mixed = calibration_ranges(model, images, OrtInt8Options(calibration_chunk=6, minmax_scopes=(named,)), tmp_path)
    calibrator = create_calibrator(model, None, calibrate_method=CalibrationMethod.MinMax,
                                   augmented_model_path=str(tmp_path / "minmax.onnx"))
    calibrator.collect_data(CalibrationReader(images))
    minmax = calibrator.compute_data()
    def bounds(ranges, name):
        return [float(np.asarray(v).ravel()[0]) for v in ranges[name].range_value]

    assert bounds(mixed, named) == bounds(minmax, named)
    (low, high), (min_low, max_high) = bounds(plain, named), bounds(minmax, named)
    assert min_low <= low and high <= max_high                     # percentile ranges lie inside MinMax's
    for name in names:
        if named not in name:
            assert bounds(mixed, name) == bounds(plain, name), name


def _candidate(scheme: str, ms: float, agreement: float, cosine: float, passed: bool) -> Candidate:
    return Candidate(scheme, None, 1, ms, {"grade_agreement": agreement, "embedding_cosine": cosine}, passed)


def test_chooser_ships_the_most_faithful_when_none_passes():
    fast_but_worse = _candidate("static", 4.0, 0.95, 0.999, passed=False)
    slow_but_faithful = _candidate("dynamic", 25.0, 0.97, 0.990, passed=False)
    chosen, reason = _choose([fast_but_worse, slow_but_faithful])
    assert chosen is slow_but_faithful and "most faithful" in reason
    tie_on_grades = _candidate("dynamic", 25.0, 0.95, 0.990, passed=False)
    assert _choose([fast_but_worse, tie_on_grades])[0] is fast_but_worse   # then the embedding decides


def test_chooser_ships_the_fastest_passing_one():
    fast = _candidate("static", 4.0, 0.98, 0.99, passed=True)
    slow = _candidate("dynamic", 25.0, 1.0, 1.0, passed=True)
    assert _choose([slow, fast])[0] is fast


def test_near_threshold_counts_images_with_a_logit_close_to_its_threshold():
    from types import SimpleNamespace

    grading = SimpleNamespace(thresholds=(0.0, 0.0, 0.0, 0.0))
    logits = np.array([[0.05, 2, 2, 2], [1, 1, 1, 1], [-3, -3, -0.09, -3]], np.float32)
    ctx = SimpleNamespace(reference_outputs={"ordinal_logits": logits}, checkpoint=SimpleNamespace(grading=grading))
    assert near_threshold_count(ctx) == {"margin": 0.1, "images": 2, "of": 3}


def test_graph_is_quantized_and_small(cpu_bundle):
    graph = onnx.load(str(cpu_bundle / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert ops & QUANTIZED_OPS, ops
    assert "LayerNormalization" in ops                                  # kept in float
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    fp32_bytes = manifest["export"]["fp32_onnx_bytes"]
    assert (cpu_bundle / "model.onnx").stat().st_size <= 0.35 * fp32_bytes
    assert manifest["export"]["size_ratio"] <= 0.35


def test_runtime_grades_like_the_fp32_bundle(cpu_bundle, onnx_bundle, phantom_test):
    paths = [str(item.path) for item in read_labels(phantom_test)]
    int8 = Grader(cpu_bundle, threads=1).grade(paths)
    fp32 = Grader(onnx_bundle, threads=1).grade(paths)
    # exact on every image clear of a CORAL threshold (an image 0.004 from one is a coin toss for INT8)
    assert_same_grades_where_clear_cut(int8, fp32, clear_cut(onnx_bundle, paths))


def _scramble_quantized_weights(ctx):
    """A broken quantizer: the largest weight tensor's values shuffled (int8 stays int8, ranges stay)."""
    graph = onnx.load(str(ctx.onnx_path))
    largest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(largest).copy()
    np.random.default_rng(0).shuffle(values.reshape(-1))
    largest.CopyFrom(onnx.numpy_helper.from_array(values, largest.name))
    onnx.save(graph, str(ctx.onnx_path))


def test_gate_refuses_broken_int8_weights(tiny_checkpoint, phantom_test, tmp_path, insert_step):
    insert_step("cpu", quantize_int8, _scramble_quantized_weights)
    out = tmp_path / "broken"
    with pytest.raises(GateError) as info:
        export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, target="cpu", precision="int8-static",
                            reference_images=phantom_test, reference_count=8, calibration_count=8),
               log=lambda _: None)
    assert any("onnx-int8: embedding_cosine" in f for f in info.value.failures)
    assert not out.exists()


def test_precision_picks_the_schemes():
    assert schemes_for(None) == ("dynamic", "static", "dynamic-u8")
    assert schemes_for("int8-dynamic-u8") == ("dynamic-u8",)
    assert schemes_for("int8-static") == ("static",)
    with pytest.raises(ConfigError, match="int8"):
        schemes_for("fp16")


def test_dynamic_int8_keeps_convolutions_float(dynamic_bundle):
    """ORT's ConvInteger is slower than its FP32 Conv (ViT-B-16 patch embedding: 10 ms), so the dynamic
    scheme quantizes the MatMuls only."""
    out = dynamic_bundle
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert "ConvInteger" not in ops and "Conv" in ops
    assert "MatMulInteger" in ops
    assert load_bundle(out).manifest.export["quantization"]["kept_float"]["dynamic_also"] == ["Conv"]
