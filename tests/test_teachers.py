"""The architecture registry and loading teachers from checkpoints at URIs."""
from __future__ import annotations

import pytest
import torch

from prism_ray.algo.teachers import (ARCHITECTURES, ModelShape, TeacherError, build_model, checkpoint_bytes,
                                     has_batchnorm, load_checkpoint, load_torchvision)
from prism_ray.config import StorageConfig, TeacherSpec
from prism_ray.config_loader import config_from_dict
from prism_ray.storage import Storage
from prism_ray.teacher_pool import load_pool, load_teacher

SMALL = ModelShape(10, 1, 28)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_runs_on_small_inputs(arch):
    model = build_model(arch, SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert has_batchnorm(model) == (arch != "alexnet")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_imagenet_shapes(arch):
    model = build_model(arch, ModelShape(1000, 3, 224)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    # the ImageNet-size model is torchvision's own: its published weights fit it exactly
    import torchvision
    ref = torchvision.models.get_model(arch)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def _trained_like(arch="convnet", shape=SMALL):
    torch.manual_seed(3)
    return build_model(arch, shape).eval()


@pytest.mark.parametrize("where", ["path", "file", "s3"])
def test_load_teacher_from_checkpoint_uri(where, tmp_path, request):
    model = _trained_like()
    blob = checkpoint_bytes(model, "convnet", SMALL)
    storage_cfg = {}
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        Storage(f"s3://{bucket}", StorageConfig(endpoint_url=endpoint)).write_bytes("ckpt/t.pt", blob)
        uri, storage_cfg = f"s3://{bucket}/ckpt/t.pt", {"endpoint_url": endpoint}
    else:
        (tmp_path / "t.pt").write_bytes(blob)
        uri = str(tmp_path / "t.pt") if where == "path" else f"file://{tmp_path}/t.pt"
    cfg = config_from_dict({"teachers": {"models": [{"name": "t", "arch": "convnet", "weights": uri}]},
                            "recover": {"primary": "t"}, "storage": storage_cfg})
    loaded = load_teacher(cfg.teacher("t"), SMALL, cfg, Storage(str(tmp_path / "run")))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_bare_state_dict_and_node_cache(tmp_path):
    model = _trained_like("shufflenet_v2_x0_5")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    cfg = config_from_dict({"teachers": {"models": [{"name": "s", "arch": "shufflenet_v2_x0_5",
                                                     "weights": str(tmp_path / "sd.pt")}],
                                         "cache_dir": str(tmp_path / "cache")},
                            "recover": {"primary": "s"}})
    pool = load_pool(["s"], SMALL, cfg, Storage(str(tmp_path / "run")), torch.device("cpu"))
    assert not any(p.requires_grad for p in pool["s"].parameters()) and not pool["s"].training
    (tmp_path / "sd.pt").unlink()  # the node-local cache now serves it
    again = load_teacher(cfg.teacher("s"), SMALL, cfg, Storage(str(tmp_path / "run")))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_checkpoint_mismatches_are_named(tmp_path):
    blob = checkpoint_bytes(_trained_like(), "convnet", SMALL)
    with pytest.raises(TeacherError, match="checkpoint is a 'convnet', the config says 'resnet18'"):
        load_checkpoint(blob, "resnet18", SMALL)
    with pytest.raises(TeacherError, match="num_classes=10, the data needs 100"):
        load_checkpoint(blob, "convnet", ModelShape(100, 1, 28))
    with pytest.raises(TeacherError, match="not a readable torch checkpoint"):
        load_checkpoint(b"garbage", "convnet", SMALL)
    sd = build_model("resnet18", SMALL).state_dict()
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    with pytest.raises(TeacherError, match="do not fit convnet"):
        load_checkpoint(buf.getvalue(), "convnet", SMALL)


def test_missing_sources_are_clear(tmp_path):
    cfg = config_from_dict({})
    with pytest.raises(TeacherError, match="run the squeeze stage first"):
        load_teacher(cfg.teacher("convnet"), SMALL, cfg, Storage(str(tmp_path)))
    spec = TeacherSpec("x", "convnet", str(tmp_path / "absent.pt"))
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(spec, SMALL, cfg, Storage(str(tmp_path)))
    with pytest.raises(TeacherError, match="need 3-channel inputs above 64 px"):
        load_torchvision("resnet18", "IMAGENET1K_V1", SMALL)
    with pytest.raises(TeacherError, match="no torchvision weights 'IMAGENET9K'"):
        load_torchvision("resnet18", "IMAGENET9K", ModelShape(1000, 3, 224))


def test_random_teachers_are_the_same_in_every_worker(tmp_path):
    cfg = config_from_dict({"teachers": {"models": [{"name": "r", "arch": "convnet", "weights": "random"},
                                                    {"name": "s", "arch": "convnet", "weights": "random"}]},
                            "recover": {"primary": "r"}})
    a = load_teacher(cfg.teacher("r"), SMALL, cfg, Storage(str(tmp_path)))
    b = load_teacher(cfg.teacher("r"), SMALL, cfg, Storage(str(tmp_path)))
    c = load_teacher(cfg.teacher("s"), SMALL, cfg, Storage(str(tmp_path)))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
        assert not torch.equal(a(x), c.eval()(x))


def test_a_checkpoint_of_an_nhwc_model_stores_nchw_weights_that_load_back():
    """Squeeze teachers and students train channels_last; their checkpoints hold plain NCHW CPU tensors."""
    model = build_model("convnet", SMALL, seed=0).to(memory_format=torch.channels_last)
    state = torch.load(__import__("io").BytesIO(checkpoint_bytes(model, "convnet", SMALL)), weights_only=True)
    convs = [v for v in state["state_dict"].values() if v.dim() == 4]
    assert convs and all(v.is_contiguous() and v.device.type == "cpu" for v in state["state_dict"].values())
    assert any(not p.is_contiguous() for p in model.parameters() if p.dim() == 4)  # the model itself stays NHWC
    loaded = load_checkpoint(checkpoint_bytes(model, "convnet", SMALL), "convnet", SMALL)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=1e-5)
