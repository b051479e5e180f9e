"""Weights that make the outputs NaN or inf stop with what to check, instead of printing garbage labels."""

import subprocess
import sys

import pytest
import torch

import nxtp_minimal
from conftest import REPO

DEMO = REPO / "weights" / "demo.safetensors"
TOKENIZER = REPO / "weights" / "demo_tokenizer.model"
IMAGE = REPO / "lessons" / "images" / "scene_0.png"


@pytest.fixture(scope="module", params=["nan", "inf"])
def broken(request, tmp_path_factory):
    model = nxtp_minimal.load(DEMO, TOKENIZER)
    with torch.no_grad():
        model.language_decoder.layers[0].feed_forward.w2.weight[0, 0] = float(request.param)
    path = tmp_path_factory.mktemp("broken") / f"{request.param}.safetensors"
    nxtp_minimal.save(path, model)
    return path


def test_sample_refuses_non_finite_outputs(broken):
    model = nxtp_minimal.load(broken, TOKENIZER)
    with pytest.raises(ValueError, match="not finite numbers.*check the weights file.*float16 on a CPU"):
        model.predict(IMAGE, k=5)


def test_predict_command_stops_with_one_line(broken):
    out = subprocess.run([sys.executable, "-m", "nxtp_minimal", "predict", str(IMAGE), "--weights", str(broken),
                          "--tokenizer", str(TOKENIZER)], capture_output=True, text=True, cwd=REPO)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stdout == ""
    assert lines[-1].startswith("error: the model's outputs are not finite numbers (NaN or inf)")
