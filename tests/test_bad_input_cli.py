"""Bad input as a user meets it, through the CLI: exit 2, one line naming the file or field and what to do, and
nothing written to the run output."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from prism_ray.algo.teachers import ModelShape, build_model, checkpoint_bytes
from prism_ray.cli import main
from tests.conftest import FMNIST_ROOT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small run: two random-weight teachers (nothing to train), Fashion-MNIST, few images.
BASE = ["--set", "data.max_per_class=20", "--set", "data.max_val=100",
        "--set", "teachers.models=[{name: a, arch: convnet, weights: random}, {name: b, arch: convnet, weights: "
                 "random}]",
        "--set", "recover.primary=a", "--set", "recover.ipc=2", "--set", "recover.iterations=2",
        "--set", "recover.schedule=flat", "--quiet"]


def tree(path) -> list[str]:
    """Every file and folder under `path` (empty when it does not exist)."""
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path)
                  for n in dirs + files) if os.path.exists(path) else []


def refused(argv: list[str], capsys, output, needle: str) -> str:
    """Run the CLI; assert exit 2, a single line on stderr containing `needle`, and `output` left as it was."""
    before = tree(output)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("prism-ray: error:") and needle in err, err
    assert tree(output) == before
    return err


def test_recover_without_squeeze_checkpoints_in_a_terminal(tmp_path):
    """The issue's example, as a user sees it: exit 2, one line, no traceback anywhere on the terminal."""
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "prism_ray", "recover", "jobs/configs/fmnist-demo.yaml", "--set",
                          f"run.output={out}", "--set", f"data.root={FMNIST_ROOT}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "has no complete squeeze stage" in lines[0] and "run the squeeze stage first" in lines[0]
    assert not out.exists()


def test_teacher_checkpoint_of_another_architecture(tmp_path, capsys):
    ckpt = tmp_path / "shufflenet.pt"
    ckpt.write_bytes(checkpoint_bytes(build_model("shufflenet_v2_x0_5", ModelShape(10, 1, 28), seed=0),
                                      "shufflenet_v2_x0_5", ModelShape(10, 1, 28)))
    out = tmp_path / "run"
    err = refused(["recover", *BASE, "--set", f"run.output={out}", "--set",
                   f"teachers.models=[{{name: a, arch: convnet, weights: '{ckpt}'}}]", "--set", "recover.bn_pool=[]"],
                  capsys, out, "checkpoint is a 'shufflenet_v2_x0_5', the config says 'convnet'")
    assert str(ckpt) in err


def test_teacher_checkpoint_of_another_class_count(tmp_path, capsys):
    ckpt = tmp_path / "convnet-5.pt"
    ckpt.write_bytes(checkpoint_bytes(build_model("convnet", ModelShape(5, 1, 28), seed=0), "convnet",
                                      ModelShape(5, 1, 28)))
    bare = tmp_path / "convnet-5-state.pt"  # a bare state_dict: the head's shape tells the class count
    torch.save(build_model("convnet", ModelShape(5, 1, 28), seed=0).state_dict(), bare)
    out = tmp_path / "run"
    for path, needle in ((ckpt, "num_classes=5, the data needs 10"), (bare, "weights do not fit convnet")):
        refused(["recover", *BASE, "--set", f"run.output={out}", "--set",
                 f"teachers.models=[{{name: a, arch: convnet, weights: '{path}'}}]", "--set", "recover.bn_pool=[]"],
                capsys, out, needle)


def test_torchvision_weights_that_do_not_exist(tmp_path, capsys):
    out = tmp_path / "run"
    refused(["recover", *BASE, "--set", f"run.output={out}", "--set", "data.channels=3", "--set",
             "data.resolution=96", "--set", "teachers.models=[{name: a, arch: resnet18, weights: "
                                           "'torchvision:IMAGENET1K_V3'}]", "--set", "recover.bn_pool=[]"],
            capsys, out, "teachers.models[0].weights: no torchvision weights 'IMAGENET1K_V3' for resnet18; allowed: "
                         "IMAGENET1K_V1")


def test_resolution_smaller_than_a_teacher_accepts(tmp_path, capsys):
    out = tmp_path / "run"
    refused(["recover", *BASE, "--set", f"run.output={out}", "--set", "data.resolution=12", "--set",
             "teachers.models=[{name: a, arch: convnet, weights: random}, {name: b, arch: alexnet, weights: random}]"],
            capsys, out, "data.resolution: 12 px is smaller than alexnet (teachers.models[1] (b)) accepts; it needs at "
                         "least 15 px")


def test_ipc_larger_than_the_smallest_class(tmp_path, capsys):
    out = tmp_path / "run"
    refused(["recover", *BASE, "--set", f"run.output={out}", "--set", "data.max_per_class=3", "--set",
             "recover.ipc=4"], capsys, out, "recover.ipc: got 4 but class 0 has only 3 training images")


def test_output_that_belongs_to_another_project(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("\\chapter{Introduction}")
    (out / "figures").mkdir()
    refused(["recover", *BASE, "--set", f"run.output={out}"], capsys, out,
            "already holds files that are not a prism-ray run (chapter1.tex, figures) and no run.json")


def test_missing_bucket(s3_endpoint, capsys):
    refused(["recover", *BASE, "--set", "run.output=s3://no-such-bucket-here/run", "--set",
             f"storage.endpoint_url={s3_endpoint}"], capsys, "/nonexistent-local-path",
            "the bucket does not exist; create it or fix run.output")


def test_s3_without_credentials(s3_endpoint, s3_bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)  # no ~/.aws either
    run = subprocess.run([sys.executable, "-m", "prism_ray", "recover", *BASE, "--set",
                          f"run.output=s3://{s3_bucket}/run", "--set", f"storage.endpoint_url={s3_endpoint}",
                          "--set", f"data.root={FMNIST_ROOT}"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    import boto3
    listing = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=s3_bucket)
    assert listing.get("KeyCount", 0) == 0
