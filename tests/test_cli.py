"""The `quantfx` command line: each subcommand end to end in a subprocess (exit status, files
written, one-line errors), plus the safe readers of models and data (`quantfx.app.models`,
`quantfx.sources`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

import quantfx as qf
from quantfx.app import cli, commands
from quantfx.app.models import load_model, load_weights
from quantfx.sources import ImageOptions, load_calibration

REPO = Path(__file__).resolve().parent.parent
MODEL_FILE = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def unfolded():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(1152, 4))


class Parted(nn.Module):
    """A backbone and a head that trace, around a branch on the data that does not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.head(self.backbone(x))
        return y if y.sum() > 0 else -y


class Yolov8Heads(nn.Module):
    """YOLOv8's head outputs at strides 8 and 16: class conv (3 classes), box conv (reg_max 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fine = nn.Sequential(nn.Conv2d(3, 8, 3, 8, 1), nn.ReLU())
        self.coarse = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.heads = nn.ModuleList(nn.ModuleList([nn.Conv2d(8, 3, 1), nn.Conv2d(8, 16, 1)])
                                   for _ in range(2))

    def forward(self, x):
        fine = self.fine(x)
        coarse = self.coarse(fine)
        return (self.heads[0][0](fine), self.heads[0][1](fine), self.heads[1][0](coarse),
                self.heads[1][1](coarse))
'''


def quantfx(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m quantfx ARGS` in a fresh interpreter, as a user runs it."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "quantfx", *args], capture_output=True,
                          text=True, cwd=cwd, env=environment, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A model file, an image folder (in class subfolders, two sizes) and a tensor file."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "tiny_model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(0)
    for index in range(10):
        (folder / "images" / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        size = (40, 30) if index % 3 else (24, 36)
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"class{index % 2}" / f"{index}.png")
    (folder / "images" / "notes.txt").write_text("not an image: skipped")
    torch.save(torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
               folder / "calib.pt")
    return folder


def test_quantize_writes_onnx_options_and_report(workspace):
    result = quantfx("quantize", "tiny_model.py:build", "--calib", "images", "--resize", "20",
                     "--crop", "16", "--batch-size", "4", "-o", "out.onnx", "--target",
                     "am68a", "--no-progress", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "bit-identical" in result.stdout and "wrote out.onnx" in result.stdout
    assert "quantfx quantize: calibration check: output SQNR" in result.stderr  # a step line
    assert "at 8 bit: " not in result.stderr  # details only with -v
    options = json.loads((workspace / "out.tidl.json").read_text())
    assert options["tensor_bits"] == 8
    report = (workspace / "out.report.md").read_text()
    assert "10 inputs of shape (3, 16, 16)" in report and "am68a" in report
    session = ort.InferenceSession(str(workspace / "out.onnx"))
    (output,) = session.run(None, {session.get_inputs()[0].name:
                                   np.zeros((1, 3, 16, 16), np.float32)})
    assert output.shape == (1, 4)
    assert not [name for name in os.listdir(workspace) if name.endswith(".tmp")]


def test_quiet_says_nothing_and_verbose_says_each_layers_measurement(workspace):
    arguments = ("quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "quiet.onnx")
    quiet = quantfx(*arguments, "-q", cwd=workspace)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and "quantfx quantize:" not in quiet.stderr
    assert (workspace / "quiet.onnx").is_file() and (workspace / "quiet.report.md").is_file()
    verbose = quantfx(*arguments, "-v", "--no-progress", cwd=workspace)
    assert verbose.returncode == 0, verbose.stderr
    assert "quantfx quantize: mixed precision: " in verbose.stderr  # its measurements
    assert "at 8 bit: " in verbose.stderr and "wrote quiet.onnx" in verbose.stdout
    both = quantfx(*arguments, "-q", "-v", cwd=workspace)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_quantize_a_partly_quantized_model_writes_each_part(workspace, monkeypatch):
    """quantize_only from --set: every quantized part in a file of its own (it calibrated the
    whole model, then failed for want of a --part the command line does not have)."""
    result = quantfx("quantize", "tiny_model.py:Parted", "--calib", "calib.pt", "--set",
                     "quantize_only=auto", "-o", "parted.onnx", "--no-progress", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "wrote parted.backbone.onnx, parted.backbone.tidl.json, parted.head.onnx" in (
        result.stdout)
    for part, channels in (("backbone", 8), ("head", 4)):
        session = ort.InferenceSession(str(workspace / f"parted.{part}.onnx"))
        shape = session.get_inputs()[0].shape
        (output,) = session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})
        assert output.shape[1] == channels
    assert not (workspace / "parted.onnx").exists()
    refused = quantfx("quantize", "tiny_model.py:Parted", "--calib", "calib.pt", "--set",
                      "quantize_only=auto", "--distill", "2", "-o", "d.onnx", cwd=workspace)
    assert refused.returncode == 2 and "part by part, without --distill" in refused.stderr
    before = {path.name: path.read_bytes() for path in workspace.glob("parted.*")}
    real_export = commands.export_onnx

    def failing_head(*args, part=None, **kwargs):
        if part == "head":
            raise qf.ExportError("the head failed")
        return real_export(*args, part=part, **kwargs)

    monkeypatch.setattr(commands, "export_onnx", failing_head)
    monkeypatch.chdir(workspace)
    assert cli.main(["quantize", "tiny_model.py:Parted", "--calib", "calib.pt", "--set",
                     "quantize_only=auto", "-o", "parted.onnx", "-q"]) == 2
    assert {path.name: path.read_bytes() for path in workspace.glob("parted.*")} == before
    assert not list(workspace.glob(".quantfx-parts-*"))  # the staged backbone is gone too


def test_quantize_a_package_factory_with_weights_and_a_tensor_file(workspace):
    model = load_model(f"{workspace / 'tiny_model.py'}:build")
    with torch.no_grad():
        model[-1].bias.fill_(3.0)  # the file's weights differ from the factory's
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, workspace / "checkpoint.pth")
    result = quantfx("quantize", "tiny_model:build", "--weights", "checkpoint.pth", "--calib",
                     "calib.pt", "-o", "tensor.onnx", "--no-progress", cwd=workspace)
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(workspace / "tensor.onnx"))
    (output,) = session.run(None, {session.get_inputs()[0].name:
                                   np.zeros((1, 3, 16, 16), np.float32)})
    assert abs(float(output.mean()) - 3.0) < 0.5  # the checkpoint's bias, not the factory's


def test_quantize_with_distill_trains_checkpoints_and_exports(workspace):
    arguments = ("quantize", "tiny_model.py:build", "--calib", "calib.pt", "--batch-size", "4",
                 "--no-progress", "--target", "tda4vm")
    result = quantfx(*arguments, "-o", "distilled.onnx", "--distill", "3", "--checkpoint",
                     "distill.pt", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "bit-identical" in result.stdout
    assert "- distill: 3 steps without labels" in (workspace / "distilled.report.md").read_text()
    assert torch.load(workspace / "distill.pt", weights_only=True)["step"] == 3
    alone = quantfx(*arguments, "-o", "lonely.onnx", "--checkpoint", "distill.pt",
                    cwd=workspace)
    assert alone.returncode == 2 and "give --distill STEPS too" in alone.stderr
    assert not (workspace / "lonely.onnx").exists()


def test_doctor_exit_status_follows_the_findings(workspace):
    clean = quantfx("doctor", "tiny_model.py:build", "--input-shape", "1,3,16,16",
                    cwd=workspace)
    assert clean.returncode == 0 and "nothing to fix" in clean.stdout, clean.stdout
    assert "calibration check" not in clean.stderr  # of its own test model, not the user's
    planted = quantfx("doctor", "tiny_model.py:unfolded", "--input-shape", "1x3x16x16",
                      "--format", "json", cwd=workspace)
    assert planted.returncode == 1, planted.stderr
    findings = json.loads(planted.stdout)["findings"]
    assert any("BatchNorm" in finding["what"] for finding in findings)


def test_analyze_prints_and_saves_its_report(workspace):
    result = quantfx("analyze", "tiny_model.py:build", "--calib", "calib.pt", "-o", "analysis",
                     "--no-progress", cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "keep at 16 bit" in result.stdout
    assert "calibration check" not in result.stderr  # three of them, of its own variants
    saved = {path.name for path in (workspace / "analysis").iterdir()}
    assert {"report.md", "report.html", "report.json"} <= saved


def test_quantize_exports_a_yolov8_detector_whole_with_its_prototxt(workspace):
    result = quantfx("quantize", "tiny_model.py:Yolov8Heads", "--calib", "calib.pt", "-o",
                     "v8.onnx", "--detection", "yolov8", "--strides", "8,16", "--num-classes",
                     "3", "--reg-max", "4", "--confidence-threshold", "0.05", "--no-progress",
                     cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "wrote v8.onnx, v8.tidl.json, v8.prototxt and v8.report.md" in result.stdout
    options = json.loads((workspace / "v8.tidl.json").read_text())
    assert options["object_detection:meta_arch_type"] == 8
    text = (workspace / "v8.prototxt").read_text()
    assert "CODE_TYPE_DIST2BBOX" in text and "confidence_threshold: 0.05" in text
    session = ort.InferenceSession(str(workspace / "v8.onnx"))
    boxes, labels, scores = session.run(None, {session.get_inputs()[0].name: np.zeros(
        (1, 3, 16, 16), np.float32)})[-3:]
    assert boxes.shape[1:] == (4,) and len(labels) == len(scores) > 0
    assert set(labels.tolist()) <= {0, 1, 2} and scores.min() >= 0.05


def test_a_bad_argument_is_one_line_and_exit_two(workspace):
    result = quantfx("quantize", "resnet19", "--calib", "calib.pt", "-o", "x.onnx",
                     cwd=workspace)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "resnet18" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["quantize", "tiny_model.py:build", "--calib", "missing", "-o", "a.onnx"],
     "does not exist"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "images"],
     "must end with .onnx"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "no/such/a.onnx"],
     "does not exist"),
    (["quantize", "tiny_model.py:build", "--calib", "images", "-o", "a.onnx", "--mean", "0.5"],
     "3 values"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "a.onnx", "--weights",
      "images"], "is a folder"),
    (["quantize", "tiny_model.py:nothing", "--calib", "calib.pt", "-o", "a.onnx"],
     "has no 'nothing'"),
    (["quantize", "no_such_module:build", "--calib", "calib.pt", "-o", "a.onnx"],
     "cannot import"),
    (["doctor", "tiny_model.py:build", "--input-shape", "1,three"], "not a list of integers"),
    (["analyze", "tiny_model.py:build", "--calib", "calib.pt", "-o", "calib.pt"], "is a file"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "a.onnx", "--strides",
      "8,16"], "give --detection yolox or --detection yolov8 too"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "a.onnx", "--detection",
      "yolox", "--num-classes", "3"], "needs --strides"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "a.onnx", "--detection",
      "yolox", "--strides", "8", "--num-classes", "3", "--reg-max", "8"],
     "with --detection yolov8 only"),
    (["quantize", "tiny_model.py:build", "--calib", "calib.pt", "-o", "a.onnx", "--reg-max",
      "8"], "give --detection yolox or --detection yolov8 too"),
    (["quantize", "tiny_model.py:build", "--calib", "images", "-o", "a.onnx", "--grayscale",
      "--mean", "0.5", "--std", "0.5"], "Check --grayscale"),  # not "pass example_inputs"
    (["analyze", "tiny_model.py:build", "--calib", "images", "--grayscale", "--mean", "0.5",
      "--std", "0.5"], "fails on the first calibration sample of shape(s) (1, 1, "),
])
def test_bad_arguments_in_process(workspace, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(workspace)
    assert cli.main(arguments + (["--no-progress"] if arguments[0] != "doctor" else [])) == 2
    lines = capsys.readouterr().err.splitlines()  # step lines, then the error, one line
    assert ": error: " in lines[-1] and message in lines[-1], lines
    assert all(line.startswith(f"quantfx {arguments[0]}: ") for line in lines), lines
    assert sum(": error: " in line for line in lines) == 1, lines


def test_doctor_names_input_shape_when_the_model_rejects_it(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert cli.main(["doctor", "tiny_model.py:build", "--input-shape", "1,1,16,16"]) == 1
    output = capsys.readouterr().out
    assert "fails on the --input-shape tensor of shape(s) (1, 1, 16, 16)" in output
    assert "example_inputs" not in output and "fix: give --input-shape" in output


@pytest.mark.parametrize("command", ["quantize", "doctor", "analyze", "check", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main([command, "--help"])
    assert exit_status.value.code == 0 and "usage: quantfx " + command in capsys.readouterr().out


def test_unknown_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["quantize", "resnet18", "--calib", "x", "-o", "y.onnx", "--bits", "4"])
    error = capsys.readouterr().err
    assert exit_status.value.code == 2 and "invalid choice" in error
    assert error.count("\n") == 1 and error.startswith("quantfx quantize: error: ")  # one line
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["demo", "--foo"])
    assert exit_status.value.code == 2 and capsys.readouterr().err == (
        "quantfx demo: error: unrecognized arguments: --foo (see quantfx demo --help)\n")
    for flag, value, message in (("--std", "0,1,1", "above 0"), ("--std", "-1,1,1", "above 0"),
                                 ("--mean", "nan,0,0", "not finite")):
        with pytest.raises(SystemExit) as exit_status:
            cli.main(["quantize", "resnet18", "--calib", "x", "-o", "y.onnx", f"{flag}={value}"])
        assert exit_status.value.code == 2 and message in capsys.readouterr().err


# quantfx.app.models and quantfx.sources: what the commands read, and what they refuse to read


def test_pickled_models_are_refused_not_unpickled(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "whole_model.pt")  # a pickle of a module
    with pytest.raises(qf.LoadError, match="never arbitrary pickles"):
        load_weights(nn.Linear(2, 2), tmp_path / "whole_model.pt")
    with pytest.raises(qf.LoadError, match="holds more than tensors"):
        load_calibration(tmp_path / "whole_model.pt")


def test_weights_of_ddp_checkpoints_and_mismatches(tmp_path):
    source = nn.Linear(3, 2)
    torch.save({f"module.{key}": value for key, value in source.state_dict().items()},
               tmp_path / "ddp.pt")
    target = nn.Linear(3, 2)
    load_weights(target, tmp_path / "ddp.pt")
    assert torch.equal(target.weight, source.weight)
    with pytest.raises(qf.LoadError, match="does not fit Linear"):
        load_weights(nn.Linear(4, 2), tmp_path / "ddp.pt")
    for index, junk in enumerate([b"hello", bytes(range(256)) * 4]):  # KeyError: 101 before
        (tmp_path / f"junk{index}.pth").write_bytes(junk)
        with pytest.raises(qf.LoadError, match="not a file torch.save wrote"):
            load_weights(nn.Linear(3, 2), tmp_path / f"junk{index}.pth")
    (tmp_path / "empty.pt").write_bytes(b"")  # the error ended in ':' with no reason
    with pytest.raises(qf.LoadError, match="is empty"):
        load_weights(nn.Linear(3, 2), tmp_path / "empty.pt")
    with warnings.catch_warnings():  # torch.jit is deprecated; users still have such files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(nn.Linear(3, 2)), tmp_path / "scripted.pt")
    with pytest.raises(qf.LoadError, match="TorchScript archive") as refused:
        load_weights(nn.Linear(3, 2), tmp_path / "scripted.pt")
    assert "weights_only" not in str(refused.value)  # torch's advice is not ours to give


def test_calibration_from_arrays_lists_and_images(tmp_path):
    np.save(tmp_path / "inputs.npy", np.ones((10, 1, 8, 8), np.float64))
    batches = load_calibration(tmp_path / "inputs.npy", limit=7, batch_size=3)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert batches[0].dtype == torch.float32
    torch.save([torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)], tmp_path / "list.pt")
    assert [len(b) for b in load_calibration(tmp_path / "list.pt", limit=6)] == [4, 2]
    images = torch.randn(6, 1, 4, 4)  # a data set saved whole: its inputs, not two batches
    torch.save((images, torch.arange(6)), tmp_path / "dataset.pt")
    assert torch.equal(torch.cat(load_calibration(tmp_path / "dataset.pt", batch_size=4)),
                       images)
    torch.save(torch.zeros(4, 3, dtype=torch.uint8), tmp_path / "bytes.pt")
    with pytest.raises(qf.LoadError, match="floating point"):
        load_calibration(tmp_path / "bytes.pt")
    (tmp_path / "gray").mkdir()
    Image.fromarray(np.full((12, 10), 255, np.uint8)).save(tmp_path / "gray" / "white.png")
    (image,) = load_calibration(tmp_path / "gray", images=ImageOptions(
        resize=8, crop=8, mean=(0.5,), std=(0.5,), grayscale=True), progress=False)
    assert image.shape == (1, 1, 8, 8) and torch.allclose(image, torch.ones_like(image))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(qf.LoadError, match="holds no images"):
        load_calibration(tmp_path / "empty")


def test_torchvision_models_are_seeded_and_named_helpfully():
    first, second = load_model("squeezenet1_0"), load_model("squeezenet1_0")
    assert not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    with pytest.raises(qf.LoadError, match="Did you mean"):
        load_model("mobilenetv2")


def _python(probe: str) -> subprocess.CompletedProcess:
    """Run `probe` in a fresh Python from the repository root."""
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)


def test_help_and_version_answer_without_importing_torch():
    """`quantfx --help` took 5-8 s: torch and ONNX Runtime were imported before argparse."""
    probe = ("import sys\nfrom quantfx.app.cli import main\n"
             "for argv in (['--help'], ['quantize', '--help'], ['--version']):\n"
             "    try:\n        main(argv)\n    except SystemExit as done:\n"
             "        assert done.code == 0, done.code\n"
             "heavy = sorted({'torch', 'onnx', 'onnxruntime'} & set(sys.modules))\n"
             "assert not heavy, heavy\n")
    done = _python(probe)
    assert done.returncode == 0, done.stderr
    assert f"quantfx {qf.__version__}" in done.stdout
    assert "--sixteen-bit-layers" in done.stdout


def test_images_of_any_mode_and_preprocessing_that_cannot_be_meant(tmp_path):
    """16-bit PNGs calibrated as saturated 8-bit (99.6 % of pixels 255); 0..255 mean/std and a
    crop larger than the resize were accepted without a word."""
    folder = tmp_path / "images"
    folder.mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)
    Image.fromarray(ramp).save(folder / "deep.png")  # a 16-bit grayscale PNG
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba).save(folder / "alpha.png")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).convert("P").save(folder / "palette.png")
    identity = ImageOptions(resize=8, crop=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    (batch,) = load_calibration(folder, images=identity, progress=False)
    alpha, deep, palette = batch  # files in sorted order
    assert float(deep.max()) < 1.0 and len(deep.unique()) > 32  # scaled, not saturated
    assert torch.allclose(alpha[0], torch.ones(8, 8)) and float(alpha[1:].abs().max()) == 0.0
    assert torch.allclose(palette, torch.full_like(palette, 3 / 255))
    ti_style = ImageOptions(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    with pytest.raises(qf.LoadError, match="divide them by 255"):
        load_calibration(folder, images=ti_style, progress=False)
    with pytest.raises(qf.LoadError, match="larger than --resize"):
        load_calibration(folder, images=ImageOptions(resize=8, crop=16), progress=False)


def test_small_images_blown_up_to_the_default_size_are_named(tmp_path, caplog):
    """A 32x32 model given no --resize/--crop was calibrated and exported at 224 silently."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * index, np.uint8)).save(folder / f"{index}.png")
    with caplog.at_level("WARNING", logger="quantfx"):
        (batch,) = load_calibration(folder, progress=False)
    assert batch.shape == (3, 3, 224, 224)
    assert "about 32 pixels" in caplog.text and "--resize 32 --crop 32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantfx"):
        load_calibration(folder, images=ImageOptions(resize=32, crop=32), progress=False)
    assert not caplog.records


def test_analyze_checks_its_output_folder_before_any_work(tmp_path, capsys):
    """`analyze -o` refused an unwritable path after minutes of work: now before the model
    even loads (a model that does not exist would be the error otherwise)."""
    assert cli.main(["analyze", "no_such_model", "--calib", str(tmp_path),
                     "-o", str(tmp_path / "missing" / "report")]) == 2
    assert "cannot write the analysis report" in capsys.readouterr().err


def test_an_error_line_stays_readable(monkeypatch, capsys):
    """A wrong weights file gave a 13 KB one-line error (every key of the state dict)."""
    from quantfx.app import commands

    def fail(args):
        raise qf.LoadError("missing keys: " + ", ".join(f"layer{i}.weight" for i in range(900)))

    monkeypatch.setattr(commands, "run_doctor", fail)
    assert cli.main(["doctor", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 700 and err.rstrip().endswith("(--traceback: all)")


def test_sigterm_while_writing_leaves_no_temporary_files(tmp_path):
    """A job killed with SIGTERM during export left hidden .tmp files beside the output:
    Python's default SIGTERM skips every cleanup; the command line turns it into Ctrl-C."""
    probe = (
        "import os, signal, sys\n"
        "from quantfx.app import cli, commands\n"
        "from quantfx.files import staged_files\n"
        "def slow(args):\n"
        f"    with staged_files({str(tmp_path / 'model.onnx')!r}):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return 0\n"
        "commands.run_doctor = slow\n"
        "sys.exit(cli.main(['doctor', 'resnet18']))\n")
    done = _python(probe)
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr
    assert list(tmp_path.iterdir()) == []
    late = (  # killed after the work, while Python shuts down: 130 too (143 before)
        "import atexit, os, signal\n"
        "from quantfx.app import cli\n"
        "cli.main = lambda: 0\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), __import__('time')"
        ".sleep(5)))\n"
        "cli.console()\n")
    assert _python(late).returncode == 130


def test_a_config_file_sets_fields_and_the_flags_given_and_set_override_it(tmp_path):
    from quantfx.app.commands import config_from_arguments as config_of
    from quantfx.arguments import build_parser

    toml = tmp_path / "quant.toml"
    toml.write_text('target = "tda4vm"\nsixteen_bit_layers = ["first"]\n'
                    "widen_sensitive_layers = false\n")
    parse = build_parser().parse_args
    config = config_of(parse(["doctor", "m", "--config", str(toml)]))
    assert (config.target, config.sixteen_bit_layers) == ("tda4vm", ("first",))
    assert not config.widen_sensitive_layers
    config = config_of(parse(["doctor", "m", "--config", str(toml), "--target", "am68a",
                            "--set", "sixteen_bit_layers=last"]))
    assert (config.target, config.sixteen_bit_layers) == ("am68a", ("last",))
    as_json = tmp_path / "quant.json"
    as_json.write_text('{"per_channel_weights": true, "target": "am68a"}')
    assert config_of(parse(["doctor", "m", "--config", str(as_json)])).per_channel_weights
    for text, message in (('{"per_chanel_weights": true}', "Did you mean 'per_channel_weights'"),
                          ('{"histogram_bins": 1000}', "power of two"),
                          ("[1, 2]", "table of QuantConfig fields"), ("{", "not valid JSON")):
        as_json.write_text(text)
        with pytest.raises(qf.QuantFxError, match=message):
            config_of(parse(["doctor", "m", "--config", str(as_json)]))
    with pytest.raises(qf.QuantFxError, match="is not a file"):
        config_of(parse(["doctor", "m", "--config", str(tmp_path)]))
    with pytest.raises(qf.QuantFxError, match="must end with .toml or .json"):
        config_of(parse(["doctor", "m", "--config", __file__]))


def test_every_config_field_is_reachable_with_set(workspace, capsys):
    """5 of 22 QuantConfig fields were reachable from the command line: doctor's own fixes
    (per_channel_depthwise, ...) could not be set."""
    from quantfx.settings import settings_from_text

    assert settings_from_text(["per_channel_depthwise=false", "sixteen_bit_layers=first,last",
                               "percentile=99.9", "histogram_bins=1024", "equalization=none",
                               "weight_rounding=learned", "quantize_only=auto"]) == {
        "per_channel_depthwise": False, "sixteen_bit_layers": ("first", "last"),
        "percentile": 99.9, "histogram_bins": 1024, "equalization": None,
        "weight_rounding": "learned", "quantize_only": "auto"}
    with pytest.raises(qf.ConfigError, match="Did you mean 'per_channel_depthwise'"):
        settings_from_text(["per_channel_dephtwise=false"])
    with pytest.raises(qf.ConfigError, match="FIELD=VALUE"):
        settings_from_text(["per_channel_depthwise"])
    with pytest.raises(qf.ConfigError, match="'autowrap_functions' holds Python functions"):
        settings_from_text(["autowrap_functions=my_function"])  # "is not one of" its fields
    assert cli.main(["doctor", "resnet18", "--input-shape", "1,3,32,32", "--target", "tda4vm",
                     "--set", "per_channel_depthwise=true"]) == 2
    assert "runs per-tensor weights only" in capsys.readouterr().err  # QuantConfig checked it



def test_the_qat_schedule_is_set_by_its_own_fields(tmp_path):
    """cli.md: --set sets any field; qat_schedule was refused ("not one of ..."). Now
    `--set qat_schedule.ranges=learned`, a TOML table, a JSON object; a misspelt schedule
    field names the closest one."""
    from quantfx.settings import settings_from_file, settings_from_text

    settings = settings_from_text(["qat_schedule.ranges=learned",
                                   "qat_schedule.freeze_bn_step=100", "percentile=99.9"])
    assert settings == {"percentile": 99.9, "qat_schedule": qf.QATSchedule(
        ranges="learned", freeze_bn_step=100)}
    assert qf.QuantConfig(**settings).schedule.ranges == "learned"
    (tmp_path / "config.toml").write_text('target = "tda4vm"\n[qat_schedule]\n'
                                          'weight_exponent = "learned"\n')
    (tmp_path / "config.json").write_text('{"qat_schedule": {"ranges": "statistics"}}')
    assert settings_from_file(tmp_path / "config.toml")["qat_schedule"].weight_exponent == (
        "learned")
    assert settings_from_file(tmp_path / "config.json")["qat_schedule"].ranges == "statistics"
    (tmp_path / "bom.toml").write_bytes(b'\xef\xbb\xbftarget = "am68a"\n')  # Notepad's BOM
    assert settings_from_file(tmp_path / "bom.toml")["target"] == "am68a"
    with pytest.raises(qf.ConfigError, match="Did you mean 'ranges'"):
        settings_from_text(["qat_schedule.range=learned"])
    with pytest.raises(qf.ConfigError, match="ranges"):
        settings_from_text(["qat_schedule.ranges=learnt"])


def test_the_analyze_then_quantize_journey_writes_a_verified_file(tmp_path):
    """docs/cli.md's journey: analyze suggests layers to keep at 16 bit, quantize takes them.
    With most of resnet18 at 16 bit the float32 sums are not exact and the end-to-end check
    alone refused the file ("please report this model"); it is verified step by step now."""
    torch.save(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
               tmp_path / "calib.pt")
    analyzed = quantfx("analyze", "resnet18", "--calib", "calib.pt", "--batch-size", "8",
                       "--target-db", "45", "-o", "analysis", "--no-progress", cwd=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr
    suggested = json.loads((tmp_path / "analysis" / "report.json").read_text())[
        "sixteen_bit_layers"]
    assert len(suggested) >= 10  # most of the model: the case that used to fail
    quantized = quantfx("quantize", "resnet18", "--calib", "calib.pt", "--batch-size", "8",
                        "--sixteen-bit-layers", ",".join(suggested), "-o", "model.onnx",
                        "--no-progress", cwd=tmp_path)
    assert quantized.returncode == 0, quantized.stderr
    assert "step by step" in quantized.stdout + quantized.stderr
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.tidl.json").is_file()
    features = json.loads((tmp_path / "model.tidl.json").read_text())
    assert any("16bit" in key for key in features)


def test_check_applies_the_target_recorded_in_the_file(tmp_path, capsys):
    """`quantfx check FILE` of a file exported for TDA4VM checked it for generic, a clean
    verdict for the wrong device; it now reads the target quantfx recorded, --target wins."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    images = torch.randn(4, 3, 8, 8)
    prepared = qf.prepare(model, (images[:1],), qf.QuantConfig(target="tda4vm", progress=False))
    qf.calibrate(prepared, [images])
    qf.export_onnx(qf.convert(prepared), (images[:1],), tmp_path / "m.onnx")
    assert cli.main(["check", str(tmp_path / "m.onnx")]) == 0
    assert capsys.readouterr().out.startswith("tda4vm:")
    assert cli.main(["check", str(tmp_path / "m.onnx"), "--target", "am68a"]) == 0
    assert capsys.readouterr().out.startswith("am68a:")
    # the API agrees with the command line (it checked every file as generic)
    assert qf.check_tidl(tmp_path / "m.onnx").target == "tda4vm"
    assert qf.check_tidl(onnx.load(str(tmp_path / "m.onnx"))).target == "tda4vm"
    assert qf.check_tidl(tmp_path / "m.onnx", "generic").target == "generic"
    future = onnx.load(str(tmp_path / "m.onnx"))  # a target a later version wrote
    onnx.helper.set_model_props(future, {"quantfx.target": "am99z"})
    with pytest.warns(qf.QuantFxWarning, match="records target 'am99z'.*checked for 'generic'"):
        assert qf.check_tidl(future).target == "generic"
