"""Config loading: YAML + --set overrides, presets, and errors that name the bad field."""
from __future__ import annotations

import json

import pytest

from prism_ray.cli import main
from prism_ray.config import ConfigError
from prism_ray.config_loader import load_config

BAD_OVERRIDES = [
    # (overrides, field the error must name, a word of what is allowed)
    (["recovr.lr=0.1"], "recovr", "did you mean 'recover'"),
    (["recover.lrr=0.1"], "recover.lrr", "did you mean 'lr'"),
    (["recover.lr=fast"], "recover.lr", "must be a number"),
    (["recover.iterations=true"], "recover.iterations", "must be an integer"),
    (["recover.iterations=2.5"], "recover.iterations", "must be an integer"),
    (["recover.lr=-1"], "recover.lr", "> 0"),
    (["recover.jpeg_quality=101"], "recover.jpeg_quality", "<= 100"),
    (["recover.selection=random"], "recover.selection", "'pre', 'intra', 'fixed'"),
    (["recover.crop_scale=[0.9, 0.1]"], "recover.crop_scale", "0 < first <= second <= 1"),
    (["recover.betas=[0.5]"], "recover.betas", "two numbers"),
    (["recover.primary=resnet99"], "recover.primary", "allowed (teachers.models names): convnet"),
    (["recover.bn_pool=[convnet, nope]"], "recover.bn_pool[1]", "unknown teacher 'nope'"),
    (["recover.preset=fancy"], "recover.preset", "allowed: prism, sre2l"),
    (["teachers.models=[{name: a, arch: lenet9}]"], "teachers.models[0].arch", "allowed:"),
    (["teachers.models=[{name: a}]"], "teachers.models[0].arch", "is required"),
    (["teachers.models=[{name: a, arch: convnet}, {name: a, arch: resnet18}]"], "teachers.models[1].name",
     "unique"),
    (["data.dataset=image_folder"], "data.train", "is required"),
    (["data.dataset=imagenet"], "data.dataset", "'fashion_mnist', 'image_folder', 'parquet'"),
    (["data.channels=2"], "data.channels", "allowed: 1, 3"),
    (["data.mean=[0.1, 0.2, 0.3]"], "data.mean", "needs 1 values"),
    (["ray.workers=0"], "ray.workers", ">= 1"),
    (["ray.gpus_per_worker=1.5"], "ray.gpus_per_worker", "fractions"),
    (["evaluate.batch_size=75"], "evaluate.batch_size", "multiple of relabel.mix_group"),
    (["relabel.epochs=5", "evaluate.epochs=10"], "relabel.epochs", "must cover evaluate.epochs"),
    (["evaluate.seeds=[]"], "evaluate.seeds", "must not be empty"),
    (["run.stages=[squeeze, distill]"], "run.stages[1]", "allowed: squeeze, recover, relabel, evaluate"),
    (["recover.lr"], "--set", "section.key=value"),
    (["recover=3"], "--set", "section.key=value"),
    (["baselines.recover={random_real: {}}"], "baselines.recover.random_real", "is taken"),
    (["baselines.recover={sre2l: {lr: high}}"], "baselines.recover.sre2l.lr", "must be a number"),
    (["baselines.recover.sre2l=null"], "baselines.recover.sre2l", "must be a mapping, got nothing"),
    (["ray.gpus_per_worker=.inf"], "ray.gpus_per_worker", "must be a finite number"),
    (["recover.r_bn=.nan"], "recover.r_bn", "must be a finite number"),
    (["recover.name=a/../b"], "recover.name", "becomes a storage path"),
    (["recover.name=''"], "recover.name", "becomes a storage path"),
    (["recover.name=a--b"], "recover.name", "without '--'"),
    (["baselines.recover={../x: {preset: sre2l}}"], "baselines.recover.../x", "becomes a storage path"),
    (["baselines.imported={prism: {uri: /x}}"], "baselines.imported.prism", "is taken"),
    (["baselines.imported={real: {uri: /x}}"], "baselines.imported.real", "is taken"),
    (["baselines.imported={a--b: {uri: /x}}"], "baselines.imported.a--b", "without '--'"),
    (["baselines.imported={ext: {ipc: 10}}"], "baselines.imported.ext.uri", "is required"),
    (["baselines.imported={ext: {uri: /x, ipc: 0}}"], "baselines.imported.ext.ipc", ">= 1"),
    (["baselines.imported={ext: {uri: /x, format: zip}}"], "baselines.imported.ext.format", "'image_folder'"),
    (["baselines.imported={ext: {url: /x}}"], "baselines.imported.ext.url", "did you mean 'uri'"),
    (["relabel.topk=11"], "relabel.topk", "0 (all logits) to 10"),
    (["data.classes=5", "relabel.topk=6"], "relabel.topk", "has 5 classes"),
    (["teachers.models=[{name: r, arch: resnet18, weights: 'torchvision:IMAGENET1K_V9'}]", "recover.primary=r"],
     "teachers.models[0].weights", "allowed: IMAGENET1K_V1"),
    (["teachers.models=[{name: r, arch: convnet, weights: 'torchvision:IMAGENET1K_V1'}]", "recover.primary=r"],
     "teachers.models[0].weights", "no published weights for 'convnet'"),
    (["teachers.models=[{name: r, arch: resnet18, weights: 'torchvision:IMAGENET1K_V1'}]", "recover.primary=r"],
     "teachers.models[0].weights", "1 channel(s) at 28 px"),
    (["teachers.models=[{name: r, arch: resnet18, weights: 'torchvision:IMAGENET1K_V1'}]", "recover.primary=r",
      "data.channels=3", "data.resolution=64"], "teachers.models[0].weights", "3 channel(s) at 64 px"),
    (["teachers.models=[{name: r, arch: resnet18, weights: 'torchvision:'}]", "recover.primary=r"],
     "teachers.models[0].weights", "needs a weights name"),
]


@pytest.mark.parametrize("overrides,field,allowed", BAD_OVERRIDES, ids=[b[1] + ":" + b[0][0] for b in BAD_OVERRIDES])
def test_bad_field_is_named(overrides, field, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.field == field
    assert field in str(info.value)
    assert allowed in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.field == "config"


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run: {name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(p)
    assert "\n" not in str(info.value) and "line 2, column 1" in str(info.value)


def test_config_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        load_config(p)
    assert info.value.field == "config"


def test_torchvision_weights_that_exist_and_fit_pass():
    cfg = load_config(None, ["teachers.models=[{name: r, arch: resnet18, weights: 'torchvision:IMAGENET1K_V1'}]",
                             "recover.primary=r", "data.channels=3", "data.resolution=224"])
    assert cfg.teacher("r").weights == "torchvision:IMAGENET1K_V1"


def test_defaults_are_the_prism_method():
    """A config that sets nothing runs PRISM as its authors do: the `prism` presets' values, several BN teachers."""
    import dataclasses
    import yaml
    from prism_ray.config_loader import preset_dir
    cfg = load_config(None)
    for section, kind in ((cfg.recover, "recover"), (cfg.evaluate, "evaluate")):
        preset = yaml.safe_load((preset_dir() / kind / "prism.yaml").read_text())
        values = dataclasses.asdict(section)
        assert {k: values[k] for k in preset} == {k: (float(v) if isinstance(values[k], float) else v)
                                                  for k, v in preset.items()}
    assert cfg.recover.bn_pool == ["mobilenet_v2", "shufflenet_v2"]  # every teacher but the primary
    assert load_config(None, ["recover.bn_pool=[]"]).recover.bn_pool == []  # single teacher when asked


def test_resolved_config_loads_back_to_itself(tmp_path):
    import yaml
    cfg = load_config(None, ["baselines.recover={sre2l: {preset: sre2l, iterations: 11}}"])
    p = tmp_path / "resolved.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(p)
    assert again.to_dict() == cfg.to_dict()
    assert again.recover_methods()["sre2l"] == cfg.recover_methods()["sre2l"]


def test_section_must_be_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("recover: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.field == "recover"


def test_yaml_then_overrides_then_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: x, output: /tmp/x}\nrecover: {lr: 0.2, ipc: 4}\nevaluate: {seeds: [1, 2]}\n")
    cfg = load_config(p, ["recover.lr=0.3", "recover.crop_scale=[0.5, 1]", "evaluate.students=[convnet, resnet18]"])
    assert cfg.recover.lr == 0.3 and isinstance(cfg.recover.lr, float)
    assert cfg.recover.ipc == 4
    assert cfg.recover.crop_scale == [0.5, 1.0]
    assert cfg.evaluate.seeds == [1, 2]
    assert cfg.evaluate.students == ["convnet", "resnet18"]


def test_presets_fill_in_and_explicit_keys_win():
    cfg = load_config(None, ["recover.preset=sre2l", "recover.iterations=7"])
    assert cfg.recover.init == "noise"  # from the preset
    assert cfg.recover.iterations == 7  # explicit beats preset
    prism = load_config(None, ["recover.preset=prism"])
    assert (prism.recover.lr, prism.recover.iterations, prism.recover.schedule) == (0.05, 4000, "cyclic")


def test_baseline_recover_inherits_shared_keys():
    cfg = load_config(None, ["recover.ipc=3", "recover.primary=shufflenet_v2", "recover.lr=0.07",
                             "baselines.recover={sre2l: {preset: sre2l, iterations: 11}}"])
    base = cfg.recover_methods()["sre2l"]
    assert base.ipc == 3 and base.primary == "shufflenet_v2"  # comparable sets
    assert base.iterations == 11 and base.init == "noise"  # its own keys, then its preset
    assert cfg.sets() == ["prism", "sre2l", "random_real"]


def test_secrets_are_redacted():
    cfg = load_config(None, ["storage.options={key: AKIAEXAMPLE, secret: hunter2}"])
    d = cfg.to_dict()
    assert "hunter2" not in str(d) and "AKIAEXAMPLE" not in str(d)
    assert cfg.storage.options["secret"] == "hunter2"


@pytest.mark.parametrize("argv,needle", [
    (["validate", "--set", "recover.lr=-3"], "recover.lr"),
    (["validate", "/no/such/config.yaml"], "config: file not found"),
    (["squeeze", "--set", "data.root=/no/such/dir", "--set", "run.output=/tmp/prism-ray-test-never"],
     "data.root"),
    (["plan", "--set", "recover.selection=sometimes"], "recover.selection"),
])
def test_cli_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert err.startswith("prism-ray: error:")


def test_validate_prints_resolved_config(capsys):
    import yaml
    assert main(["validate", "--set", "recover.preset=prism", "--set",
                 "baselines.recover={sre2l: {preset: sre2l}}"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["recover"]["iterations"] == 4000
    sre2l = out["baselines"]["recover"]["sre2l"]  # the baseline with its preset applied, not just {preset: sre2l}
    assert (sre2l["init"], sre2l["lr"], sre2l["iterations"], sre2l["selection"]) == ("noise", 0.25, 4000, "fixed")


def test_imported_sets_join_the_runs_sets_after_its_own():
    cfg = load_config(None, ["baselines.recover={sre2l: {preset: sre2l}}",
                             "baselines.imported={rded: {uri: /data/rded, ipc: 5}, ext: {uri: s3://b/x}}"])
    assert cfg.sets() == ["prism", "sre2l", "random_real", "rded", "ext"]
    assert (cfg.imported_ipc("rded"), cfg.imported_ipc("ext")) == (5, cfg.recover.ipc)
    assert load_config(None, []).sets() == ["prism", "random_real"]
    again = load_config(None, [f"baselines.imported={json.dumps(cfg.to_dict()['baselines']['imported'])}"])
    assert again.baselines.imported == cfg.baselines.imported  # the recorded config loads back
