"""A real shard: 10 Fashion-MNIST classes from trained teachers, on the CPU."""
from __future__ import annotations

import pytest
import torch

from prism_ray.algo.encode import decode_images
from prism_ray.algo.synthesize import ShardSpec, synthesize_shard
from prism_ray.algo.seeding import derive_seed
from prism_ray.config import RecoverConfig


def mean(values) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
def test_ten_class_shard_losses_fall_and_primary_recognises_it(fashion_mnist_pool):
    pool, train, fixture_seconds = fashion_mnist_pool
    # Reference values scaled to 28 px: a 32 px roll or an 8% crop would leave nothing of the image. With 10
    # images per batch the BN statistics are far noisier than at ImageNet's 100 x 224 px (BN losses ~200
    # instead of tens), so r_bn is lowered for the CE term to keep its say.
    cfg = RecoverConfig(primary="convnet", bn_pool=["mobilenet_v2", "shufflenet_v2_x0_5"], selection="pre",
                        slots=2, slot_prob=1.0, init="real", lr=0.25, iterations=100, schedule="flat",
                        jitter=2, crop_scale=[0.8, 1.0], r_bn=0.003, first_bn_multiplier=10.0,
                        image_format="jpeg", jpeg_quality=75)
    classes = list(range(10))
    spec = ShardSpec("ipc0000-cls0000-0009", 0, classes, derive_seed(0, "recover", "prism", "ipc0000-cls0000-0009"))
    init = train.images_at(classes, 0)
    result = synthesize_shard(pool, spec, cfg, train.normalization, init)

    h = result.history
    ce_start, ce_end = mean(h["loss_ce"][:5]), mean(h["loss_ce"][-5:])
    bn_start, bn_end = mean(h["loss_bn"][:5]), mean(h["loss_bn"][-5:])
    decoded = decode_images(result.encoded, train.normalization)
    with torch.no_grad():
        predicted = pool["convnet"](decoded).argmax(1)
        init_predicted = pool["convnet"](init).argmax(1)
    accuracy = (predicted == torch.tensor(classes)).float().mean().item()
    init_accuracy = (init_predicted == torch.tensor(classes)).float().mean().item()
    print(f"\nfixture {fixture_seconds:.1f}s; shard {result.seconds:.1f}s, {result.iterations} iterations, "
          f"teachers {result.records[0].bn_teachers}; CE {ce_start:.3f} -> {ce_end:.3f}, "
          f"BN {bn_start:.1f} -> {bn_end:.1f}; primary top-1 {init_accuracy:.0%} on the real start, "
          f"{accuracy:.0%} on the decoded synthetic images")

    assert result.records[0].bn_teachers == ["convnet", "mobilenet_v2", "shufflenet_v2_x0_5"]
    assert result.bn_teacher_usage == {name: 100 for name in pool}
    assert ce_end < 0.6 * ce_start
    assert bn_end < 0.9 * bn_start
    assert accuracy >= 0.9
    assert [r.class_id for r in result.records] == classes
