"""`prism-ray plan`: what a config would do, computed from the config alone (no Ray, no writes).

Figures: shards and images per recover set, optimization steps, teacher forward+backward passes
(batches and images), and the storage the images will take, estimated from measured bytes per pixel.
"""
from __future__ import annotations

from prism_ray.algo.schedule import iterations_for
from prism_ray.config import Config, RecoverConfig, resolved_resize
from prism_ray.estimate import expected_extra_teachers
from prism_ray.formatting import human_bytes

# Bytes per pixel (all channels) of stored synthetic images, measured on recover outputs: synthetic images
# are high-frequency, so they compress worse than photos.
BYTES_PER_PIXEL = {("jpeg", 1): 0.55, ("jpeg", 3): 0.75, ("png", 1): 0.95, ("png", 3): 2.6}
MANIFEST_BYTES_PER_IMAGE = 120


def recover_figures(rc: RecoverConfig, num_classes: int, channels: int, resolution: int) -> dict:
    groups = -(-num_classes // rc.class_group)
    steps = sum(iterations_for(k, rc.iterations, rc.schedule, rc.cyclic_step, rc.cyclic_period)
                for k in range(rc.ipc)) * groups
    images = num_classes * rc.ipc
    teachers_per_step = 1 + expected_extra_teachers(rc)
    image_steps = steps * num_classes / groups  # each step optimizes a batch of (about) class_group images
    per_image = BYTES_PER_PIXEL[(rc.image_format, channels)] * resolution * resolution
    return {"shards": rc.ipc * groups, "images": images, "steps": steps,
            "teacher_passes": steps * teachers_per_step, "teacher_image_passes": image_steps * teachers_per_step,
            "storage_bytes": images * (per_image + MANIFEST_BYTES_PER_IMAGE)}



def num_classes_for(cfg: Config) -> int:
    """data.classes when set (no listing needed), else the data set's class count."""
    if cfg.data.classes:
        return cfg.data.classes
    from prism_ray.runs import data_context
    return data_context(cfg, write=False).num_classes  # reads data.index or the run's index; lists only without


def describe(cfg: Config, num_classes: int | None = None) -> str:
    n = num_classes or num_classes_for(cfg)
    d = cfg.data
    lines = [f"run {cfg.run.name} -> {cfg.run.output}",
             f"data: {d.dataset}, {n} classes, {d.channels}x{d.resolution}x{d.resolution}"
             + (f" (real images: shorter side {resolved_resize(d)}, centre crop {d.resolution})"
                if resolved_resize(d) != d.resolution else "")]
    squeeze = [t.name for t in cfg.teachers.models if t.weights == "squeeze"]
    if "squeeze" in cfg.run.stages and squeeze:
        lines.append(f"squeeze: train {len(squeeze)} teacher(s) ({', '.join(squeeze)}) for {cfg.squeeze.epochs:g} "
                     f"epoch(s)")
    total_bytes = 0.0
    if "recover" in cfg.run.stages:
        for name, rc in cfg.recover_methods().items():
            f = recover_figures(rc, n, d.channels, d.resolution)
            total_bytes += f["storage_bytes"]
            extra = expected_extra_teachers(rc)
            lines.append(
                f"recover {name}: {f['shards']} shards ({rc.ipc} IPC x {-(-n // rc.class_group)} groups of "
                f"<= {rc.class_group} classes), {f['images']:,} images, {f['steps']:,} optimization steps, "
                f"{f['teacher_passes']:,.0f} teacher forward+backward passes on batches "
                f"(1 primary + {extra:.2f} BN teachers per step on average; "
                f"{f['teacher_image_passes']:,.0f} image passes), about {human_bytes(f['storage_bytes'])}")
        if cfg.baselines.random_real:
            per = BYTES_PER_PIXEL[(cfg.recover.image_format, d.channels)] * d.resolution ** 2
            size = n * cfg.recover.ipc * (per + MANIFEST_BYTES_PER_IMAGE)
            total_bytes += size
            lines.append(f"random real: {n * cfg.recover.ipc:,} images, about {human_bytes(size)}")
        for name, spec in cfg.baselines.imported.items():
            lines.append(f"import {name}: up to {n * cfg.imported_ipc(name):,} images from {spec.uri} (listed and "
                         f"checked when the run starts; {-(-n // cfg.recover.class_group)} class groups)")
    sets = cfg.sets()
    if "relabel" in cfg.run.stages:
        from prism_ray.stages.relabel import relabel_figures
        fig = relabel_figures(cfg, n)
        if cfg.relabel.mode == "stored":
            total_bytes += fig["bytes"] * len(sets)
        lines.append(f"relabel ({cfg.relabel.mode}): {fig['describe']} per set, {len(sets)} sets "
                     f"({fig['teacher_forwards'] * len(sets):,} teacher image forwards in all)")
    if "evaluate" in cfg.run.stages:
        e = cfg.evaluate
        runs = len(sets) * len(e.students) * len(e.seeds)
        lines.append(f"evaluate: {runs} student trainings ({len(sets)} sets x {len(e.students)} students x "
                     f"{len(e.seeds)} seeds), {e.epochs} epochs each on {n * cfg.recover.ipc:,} images")
    lines.append(f"storage, about: {human_bytes(total_bytes)}")
    from prism_ray.memory import worker_memory
    where = (f"{cfg.ray.gpus_per_worker:g} GPU, {cfg.ray.cpus_per_worker:g} CPU" if cfg.ray.gpus_per_worker else
             f"{cfg.ray.cpus_per_worker:g} CPU, no GPU")
    lines.append(f"memory per worker ({where}; from the networks' sizes plus measured overheads, a bound real workers "
                 f"stayed under in bench/worker_bounds.py):")
    lines += [f"  {w.describe()}" for w in worker_memory(cfg, n)]
    return "\n".join(lines)
