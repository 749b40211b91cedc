"""The bill of `prism-ray plan`: FLOP counts, GPU-hours per stage, wall time, measured efficiencies."""
from __future__ import annotations

import json

import pytest

from prism_ray import cli
from prism_ray.algo.schedule import iterations_for
from prism_ray.config import ConfigError
from prism_ray.config_loader import load_config
from prism_ray.estimate import ASSUMED_EFFICIENCY, bill, bill_lines, expected_extra_teachers, gpu_peak, network_flops

IMAGENET = "jobs/configs/imagenet/resnet18.yaml"
AT_IPC50 = ["recover.ipc=50"]


def test_flop_counts_of_known_networks():
    r18 = network_flops("resnet18", 224, 1000, 3)
    # torchvision's resnet18: 1.81 GMACs per 224-px image = 3.63 GFLOP at 2 FLOPs per multiply-add
    assert r18["forward"] == pytest.approx(3.63e9, rel=0.01)
    # frozen weights: only the input gradient, as costly as the forward pass; training adds weight gradients
    assert r18["backward_input"] == pytest.approx(r18["forward"], rel=0.01)
    assert r18["backward"] == pytest.approx(2 * r18["forward"], rel=0.05)
    mobilenet = network_flops("mobilenet_v2", 224, 1000, 3)
    assert mobilenet["forward"] == pytest.approx(0.60e9, rel=0.02)
    # depthwise convolutions: weight gradients cost their forward FLOPs, not groups times more
    assert mobilenet["backward"] == pytest.approx(2 * mobilenet["forward"], rel=0.01)
    assert network_flops("resnet18", 112, 1000, 3)["forward"] < r18["forward"] / 3.5  # ~ resolution squared


def test_gpu_names_and_errors():
    assert gpu_peak("h200") == ("H200", 989.0)
    assert gpu_peak("RTX-4090")[0] == "RTX 4090"
    with pytest.raises(ConfigError, match="--gpu: unknown GPU 'V100'; allowed: H100, H200"):
        gpu_peak("V100")
    cfg = load_config(IMAGENET, AT_IPC50)
    with pytest.raises(ConfigError, match="--efficiency"):
        bill(cfg, 1000, "H200", efficiency=1.5)
    with pytest.raises(ConfigError, match="--gpus"):
        bill_lines(bill(cfg, 1000, "H200"), gpus=0)


def test_imagenet_recover_bill_by_hand():
    cfg = load_config(IMAGENET, AT_IPC50)
    b = bill(cfg, 1000, "A100", bench_files=[])
    stages = {s.stage: s for s in b.stages}
    assert list(stages) == ["recover/prism", "recover/sre2l-images", "relabel", "evaluate"]
    fl = {n: network_flops(n, 224, 1000, 3) for n in ("resnet18", "mobilenet_v2", "efficientnet_b0",
                                                      "shufflenet_v2_x0_5")}
    run = {n: f["forward"] + f["backward_input"] for n, f in fl.items()}
    # 3 slots at 0.5 over 4 members: each drawn with probability 1.5 / 4; alexnet (no BN) is never run
    p = expected_extra_teachers(cfg.recover) / 4
    assert p == pytest.approx(0.375)
    per_image_step = run["resnet18"] + p * (run["mobilenet_v2"] + run["efficientnet_b0"] + run["shufflenet_v2_x0_5"])
    image_steps = sum(iterations_for(k, 4000, "cyclic", 500, 8) for k in range(50)) * 1000
    prism = stages["recover/prism"]
    assert prism.flops == pytest.approx(image_steps * per_image_step, rel=1e-9)
    assert prism.units == 500 and prism.source == "assumed"
    # fp32 (the reference's precision): TF32 convolutions, at half the bf16 peak
    assert prism.precision == "fp32"
    assert prism.gpu_hours == pytest.approx(prism.flops / (0.5 * 312e12 * ASSUMED_EFFICIENCY["recover"]) / 3600)
    bf16 = bill(load_config(IMAGENET, [*AT_IPC50, "recover.precision=bf16"]), 1000, "A100", bench_files=[])
    assert bf16.stages[0].gpu_hours == pytest.approx(prism.gpu_hours / 2)
    # the SRe2L baseline: the primary alone, 4000 flat iterations (SRe2L's recover.sh)
    assert stages["recover/sre2l-images"].flops == pytest.approx(4000 * 50 * 1000 * run["resnet18"], rel=1e-9)
    # wall time: 500 shards over 16 GPUs is 32 rounds of the average shard, at least the longest shard
    wall = prism.wall_hours(16)
    assert wall == pytest.approx(32 * prism.gpu_hours / 500, rel=1e-9)
    assert prism.wall_hours(1000) == pytest.approx(prism.largest_unit_flops / prism.flops * prism.gpu_hours)
    assert b.gpu_hours == pytest.approx(sum(s.gpu_hours for s in b.stages))


def test_a_bench_json_from_that_gpu_replaces_the_assumption(tmp_path):
    cfg = load_config(IMAGENET, AT_IPC50)
    mine = tmp_path / "gpu_recover.json"
    mine.write_text(json.dumps({"gpu": "H200", "efficiency": {"recover": 0.2}}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"gpu": "A100", "efficiency": {"recover": 0.5}}))
    b = bill(cfg, 1000, "H200", bench_files=[str(other), str(mine)])
    prism = next(s for s in b.stages if s.stage == "recover/prism")
    assert prism.efficiency == 0.2 and prism.source == f"measured ({mine})"
    assert next(s for s in b.stages if s.stage == "relabel").source == "assumed"  # no relabel figure in the JSON
    given = bill(cfg, 1000, "H200", efficiency=0.5, bench_files=[str(mine)])
    assert {s.source for s in given.stages} == {"given (--efficiency)"}


def test_plan_prints_the_bill_and_wall_time(capsys):
    assert cli.main(["plan", IMAGENET, "--set", "recover.ipc=50", "--gpu", "H100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "recover prism: 500 shards" in out  # the plan's own lines are still there
    assert "GPU-hours on H100 (dense bf16 peak 989 TFLOP/s)" in out
    assert "recover/prism:" in out and "wall on 8 GPUs" in out and "total:" in out


def test_plan_with_an_unknown_gpu_is_one_line(capsys):
    assert cli.main(["plan", IMAGENET, "--gpu", "TPU"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["prism-ray: error: --gpu: unknown GPU 'TPU'; allowed: H100, H200, A100, "
                                        "A10G, L4, RTX 4090"]
