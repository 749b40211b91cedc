"""The `prism` and `sre2l` recover presets hold the reference values and resolve through the config loader."""
from __future__ import annotations

import pytest
import yaml

from prism_ray.algo.schedule import iterations_for
from prism_ray.algo.selection import TeacherSelection
from prism_ray.config_loader import load_config, preset_dir

PRESETS = preset_dir()  # the presets shipped inside the package


@pytest.mark.parametrize("name", ["prism", "sre2l"])
def test_presets_name_no_teachers(name):
    data = yaml.safe_load((PRESETS / "recover" / f"{name}.yaml").read_text())
    assert not {"primary", "bn_pool", "preset", "name"} & set(data)


def test_prism_preset_is_the_reference():
    rc = load_config(overrides=["recover.preset=prism"]).recover
    assert (rc.selection, rc.slots, rc.slot_prob) == ("pre", 3, 0.5)
    assert (rc.bn_average, rc.bn_normalize, rc.r_bn, rc.first_bn_multiplier) == ("reference", False, 0.01, 10.0)
    assert (rc.draw_per, rc.precision) == ("ipc", "fp32")  # one draw per IPC index; fp32 teachers
    assert (rc.init, rc.lr, rc.betas) == ("real", 0.05, [0.5, 0.9])
    assert (rc.jitter, rc.crop_scale, rc.class_group) == (32, [0.08, 1.0], 100)
    assert (rc.image_format, rc.jpeg_quality) == ("jpeg", 75)
    schedule = [iterations_for(k, rc.iterations, rc.schedule, rc.cyclic_step, rc.cyclic_period) for k in range(9)]
    assert schedule == [4000, 3500, 3000, 2500, 2000, 1500, 1000, 500, 4000]


def test_sre2l_preset_is_single_teacher_from_noise():
    rc = load_config(overrides=["recover.preset=sre2l"]).recover
    assert (rc.init, rc.lr, rc.iterations, rc.schedule) == ("noise", 0.25, 4000, "flat")  # SRe2L recover.sh
    assert (rc.r_bn, rc.first_bn_multiplier, rc.jitter, rc.crop_scale) == (0.01, 10.0, 32, [0.08, 1.0])
    assert (rc.selection, rc.fixed) == ("fixed", [])
    sel = TeacherSelection(rc.primary, rc.selection, pool=["mobilenet_v2"], slots=rc.slots, prob=rc.slot_prob,
                           fixed=rc.fixed)
    assert sel.next_step() == [rc.primary]
    assert iterations_for(5, rc.iterations, rc.schedule, rc.cyclic_step, rc.cyclic_period) == 4000


def test_sre2l_as_a_baseline_beside_prism(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "recover": {"preset": "prism", "bn_pool": ["mobilenet_v2", "shufflenet_v2"], "ipc": 10},
        "baselines": {"recover": {"sre2l": {"preset": "sre2l"}}},
    }))
    cfg = load_config(cfg_file, overrides=["recover.bn_average=reference"])
    methods = cfg.recover_methods()
    assert list(methods) == ["prism", "sre2l"]
    prism, sre2l = methods["prism"], methods["sre2l"]
    assert prism.bn_average == "reference" and prism.bn_pool == ["mobilenet_v2", "shufflenet_v2"]
    assert (sre2l.selection, sre2l.init, sre2l.lr) == ("fixed", "noise", 0.25)
    assert sre2l.primary == prism.primary and sre2l.ipc == prism.ipc == 10
