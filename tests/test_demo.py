"""The demo (issue #2): the whole pipeline on scikit-learn's digits, and its command line."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from quantfx import QuantFxError  # noqa: E402
from quantfx.app.cli import main as cli_main  # noqa: E402
from quantfx.demo import run_demo  # noqa: E402
from quantfx.demo.datasets import load_demo_data  # noqa: E402


def test_demo_on_digits_keeps_accuracy_and_prints_table(capsys: pytest.CaptureFixture) -> None:
    result = run_demo(dataset="digits", epochs=6, qat_epochs=1, calibration_images=256)
    printed = capsys.readouterr().out
    float_accuracy = result.accuracy("float training")
    quantized_accuracy = result.accuracy("quantized eval (converted model)")
    assert float_accuracy is not None and float_accuracy > 0.9
    assert quantized_accuracy is not None
    assert abs(float_accuracy - quantized_accuracy) < 0.03
    assert "float training" in printed and "quantized eval (converted model)" in printed
    assert "accuracy" in printed and "time (s)" in printed
    assert not result.failed, result.table()


def test_the_demo_command_runs_as_a_user_runs_it(tmp_path) -> None:
    """`python -m quantfx demo` in a fresh process: exit 0 and the table, every stage run."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "quantfx", "demo", "--dataset", "digits", "--epochs", "2",
         "--qat-epochs", "1", "--calibration-images", "128", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("float training", "quantized eval (converted model)",
                  "ONNX Runtime eval (exported model)", "QAT eval (converted model)"):
        assert stage in done.stdout
    assert "top-1 agrees with converted model on 100.00%" in done.stdout
    assert list(tmp_path.iterdir()) == []  # its files go to a temporary folder


def test_bad_data_dir_names_the_fix(tmp_path) -> None:
    with pytest.raises(QuantFxError, match="--data-dir.*dataset-fashion-mnist|dataset-fashion"):
        load_demo_data("fashion-mnist", str(tmp_path))


def test_cli_reports_bad_data_dir_without_traceback(tmp_path, capsys) -> None:
    assert cli_main(["demo", "--data-dir", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert "Fashion-MNIST not found" in error and "Traceback" not in error


def test_cli_help_describes_demo(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--data-dir" in capsys.readouterr().out


def test_fashion_mnist_reader_on_synthetic_idx_files(tmp_path) -> None:
    import gzip
    import struct

    import numpy as np

    from quantfx.demo.datasets import FASHION_MNIST_FILES, load_fashion_mnist_tensors

    rng = np.random.default_rng(0)
    for images_name, labels_name in FASHION_MNIST_FILES.values():
        pixels = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=5, dtype=np.uint8)
        with gzip.open(tmp_path / images_name, "wb") as stream:
            stream.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 5, 28, 28) + pixels.tobytes())
        with gzip.open(tmp_path / labels_name, "wb") as stream:
            stream.write(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + labels.tobytes())
    images, targets = load_fashion_mnist_tensors("test", tmp_path)
    assert images.shape == (5, 1, 28, 28) and images.dtype.is_floating_point
    assert targets.dtype.is_floating_point is False and targets.shape == (5,)
    assert int(targets.max()) < 10
