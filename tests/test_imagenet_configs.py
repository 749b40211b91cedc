"""The authors' ImageNet-1K experiments as configs (jobs/configs/imagenet/): `prism-ray validate` prints the
reference's value for every row of issue 17's table, and `prism-ray plan` works on each."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prism_ray import cli

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "imagenet"
FAMILIES = {  # student -> (relabel teachers, ensemble): relabel_r18.sh / _r50.sh / _r101.sh, --candidate-number 4
    "resnet18": (["resnet18", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5"], "mean_norm"),
    "resnet50": (["resnet50", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5"], "primary_weighted"),
    "resnet101": (["resnet101", "mobilenet_v2", "alexnet", "shufflenet_v2_x0_5"], "primary_weighted"),
}


def validated(capsys, name: str, *sets: str) -> dict:
    args = ["validate", str(CONFIGS / f"{name}.yaml")]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_validate_prints_the_reference_for_every_row(capsys, family):
    c = validated(capsys, family)
    d, rc, rl, ev = c["data"], c["recover"], c["relabel"], c["evaluate"]
    # validation and real-init preprocessing: Resize(256) + CenterCrop(224)
    assert (d["resolution"], d["resize"]) == (224, 256)
    # student schedule: the per-epoch stretched cosine, then linear decay
    assert ev["schedule"] == "prism_reference"
    # BN-loss divisor: every drawn teacher, alexnet included; one teacher draw per IPC index
    assert rc["bn_average"] == "reference" and rc["draw_per"] == "ipc"
    assert rc["bn_pool"] == ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet"]
    assert (rc["selection"], rc["slots"], rc["slot_prob"]) == ("pre", 3, 0.5)
    # student batch: 50 as 2 accumulation steps of 25
    assert (ev["batch_size"], ev["accumulation_steps"], rl["mix_group"]) == (50, 2, 50)
    # student and recover precision: fp32
    assert ev["precision"] == "fp32" and rc["precision"] == "fp32"
    # reported accuracy: scored every 10 epochs, best and final kept
    assert ev["eval_every"] == 10 and ev["epochs"] == 300
    # experiments shipped: the family's student and relabel ensemble, at the scripts' IPC 10
    assert rc["ipc"] == 10 and ev["students"] == [family]
    assert (rl["teachers"], rl["ensemble"]) == FAMILIES[family]
    assert (rl["crop_scale"], rl["cutmix"], rl["topk"]) == ([0.25, 1.0], True, 0)
    # data_synthesis.py never reads --arch-name: the logits teacher is resnet18 in every family
    assert rc["primary"] == "resnet18"
    assert (rc["lr"], rc["iterations"], rc["schedule"], rc["r_bn"], rc["init"]) == (0.05, 4000, "cyclic", 0.01, "real")
    weights = {t["name"]: t["weights"] for t in c["teachers"]["models"]}
    assert set(weights.values()) == {"torchvision:IMAGENET1K_V1"}  # `pretrained=True`
    # the SRe2L baseline: SRe2L's recover.sh, under a name that says PRISM relabels and trains on its images
    sre2l = c["baselines"]["recover"]["sre2l-images"]
    assert (sre2l["lr"], sre2l["iterations"], sre2l["r_bn"], sre2l["init"]) == (0.25, 4000, 0.01, "noise")
    assert (sre2l["selection"], sre2l["fixed"], sre2l["schedule"]) == ("fixed", [], "flat")


def test_ipc_50_is_one_override(capsys):
    c = validated(capsys, "resnet50", "recover.ipc=50")
    assert c["recover"]["ipc"] == 50 and c["baselines"]["recover"]["sre2l-images"]["ipc"] == 50


def test_sre2l_end_to_end_is_sre2l_s_scripts(capsys):
    c = validated(capsys, "sre2l")
    rc, rl, ev = c["recover"], c["relabel"], c["evaluate"]
    assert (rc["name"], rc["primary"], rc["init"], rc["lr"], rc["iterations"], rc["r_bn"]) == \
        ("sre2l", "resnet18", "noise", 0.25, 4000, 0.01)
    assert (rl["teachers"], rl["crop_scale"], rl["mix_group"]) == (["resnet18"], [0.08, 1.0], 1024)
    assert (ev["loss"], ev["temperature"], ev["batch_size"], ev["accumulation_steps"]) == ("kl", 20.0, 1024, 2)
    assert (ev["schedule"], ev["precision"], ev["eval_every"]) == ("cosine_epoch", "fp32", 10)
    assert c["data"]["resize"] == 256


@pytest.mark.parametrize("family", [*sorted(FAMILIES), "sre2l"])
def test_plan_prints_shards_gpu_hours_and_memory(capsys, family):
    assert cli.main(["plan", str(CONFIGS / f"{family}.yaml"), "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    shards = "100 shards" if family == "sre2l" else "recover prism: 100 shards"
    assert shards in out and "real images: shorter side 256, centre crop 224" in out
    assert "GPU-hours on H100" in out and "total:" in out and "fp32: TF32" in out
    assert "memory per worker" in out and "student: host" in out
