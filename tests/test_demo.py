import json

from edgeretina.bundle import load_bundle
from edgeretina.demo import DemoConfig, format_summary, run_demo

REQUIRED_METRICS = {"qwk", "accuracy", "referable_sensitivity", "referable_specificity", "n"}


def test_demo_leaves_checkpoint_bundle_test_set_and_metrics(tmp_path):
    config = DemoConfig(workdir=tmp_path, n_train=60, n_test=20, photo_size=128, epochs=1, train_minutes=2.0,
                        threads=2)
    metrics = run_demo(config, log=lambda _: None)
    assert (tmp_path / "checkpoint.pt").is_file()
    assert load_bundle(tmp_path / "bundle").manifest.export["gate"]["onnx-fp32"]["passed"]
    assert (tmp_path / "test" / "labels.csv").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED_METRICS <= set(saved)
    assert saved["n_total"] == 20 and saved["n"] + saved["n_ungradable"] + saved["n_errors"] == 20
    assert saved == json.loads(json.dumps(metrics))
    assert "QWK" in format_summary(metrics)
