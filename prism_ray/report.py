"""The run's report: a results Parquet (set x student x seed), a Markdown report with the accuracy table
(mean +- std per set and student), the paired comparison of the method against each baseline (per student
seed, with a 95 % t interval), the diversity and real-init retention tables, teacher accuracies and compute
per stage, a PNG grid of samples and a PNG diversity plot.

Everything is read from the run's committed manifests, so `prism-ray report RUN_URI` works on any run.
A report of another IPC (a grown run) is kept under report/ipc<N>/ before the new one is written.
"""
from __future__ import annotations

import io
import json
import math
import sys
from collections import defaultdict

import pyarrow as pa
from PIL import Image, ImageDraw

from prism_ray.runs import RUN_RECORD
from prism_ray.stages.base import StageError, identity
from prism_ray.stages.evaluate import DIVERSITY_PREFIX, REAL, REPORT, STUDENTS_PREFIX
from prism_ray.stages.imported import read_summary
from prism_ray.stages.recover import recover_prefix
from prism_ray.stages.relabel import RELABEL_PREFIX
from prism_ray.stats import mean_std, paired_difference
from prism_ray.storage import ShardStore, Storage, parquet_table

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _combined(storage: Storage, prefix: str) -> list[dict]:
    """The rows of a complete stage's combined manifest ([] while it is not complete)."""
    try:
        return ShardStore(storage, prefix).read_combined().to_pylist()
    except FileNotFoundError:
        return []


def _output_table(storage: Storage, prefix: str, row: dict) -> list[dict]:
    """The Parquet output one manifest row names, checked against its sha256."""
    return parquet_table(ShardStore(storage, prefix).read_output(row)).to_pylist()


def lineage(storage: Storage) -> list[dict]:
    """What the evaluate stages were made from, checked: every upstream output each of them recorded must be the
    one the run holds now (a report never mixes outputs of two lineages). One row per stage: its generation,
    config digest and the identities of its upstream outputs."""
    rows = []
    for prefix in (RELABEL_PREFIX, DIVERSITY_PREFIX, STUDENTS_PREFIX):
        record = ShardStore(storage, prefix).record()
        if record is None:
            continue
        made_from = record.get("upstream") or {}
        for up, recorded in sorted(made_from.items()):
            now = identity(storage, up)
            if now != recorded:
                was = f"generation {recorded['generation']}" if recorded else "an incomplete stage"
                is_now = f"generation {now['generation']}" if now else "not complete"
                raise StageError(f"{storage.uri()}: the run's outputs are of two lineages: {prefix} was made from "
                                 f"{up} {was}, which is now {is_now}; rerun the evaluate stage (prism-ray evaluate "
                                 f"CONFIG --fresh) before reporting")
        rows.append({"stage": prefix, "generation": record["generation"], "config": record.get("config_digest"),
                     "upstream": {up: {"generation": v["generation"], "config": v["config"]} if v else None
                                  for up, v in sorted(made_from.items())}})
    return rows


def collect(storage: Storage) -> dict:
    """Every figure of the report, from storage alone."""
    if not storage.exists(RUN_RECORD):
        raise StageError(f"no prism-ray run at {storage.uri()}")
    record = storage.read_json(RUN_RECORD)
    cfg = record["config"]
    results = _combined(storage, STUDENTS_PREFIX)
    if not results:
        raise StageError(f"{storage.uri()}: the evaluate stage has no complete results yet; run it first")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["set"], r["student"])].append(r)
    # the config's order of sets (the method, then its baselines), whatever order units committed in
    imported = list(cfg["baselines"].get("imported") or {})
    names = [cfg["recover"]["name"], *cfg["baselines"]["recover"], "random_real", *imported, REAL]
    names += [r["set"] for r in results if r["set"] not in names]
    order = {name: i for i, name in enumerate(dict.fromkeys(names))}
    accuracy = []
    for (set_name, student), rows in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        t1, s1 = mean_std([r["top1"] for r in rows])
        t5, s5 = mean_std([r["top5"] for r in rows])
        entry = {"set": set_name, "student": student, "top1_mean": t1, "top1_std": s1, "top5_mean": t5,
                 "top5_std": s5, "seeds": sorted(r["seed"] for r in rows)}
        if all(r.get("best_top1") is not None for r in rows):  # runs made before best scores were kept lack them
            b1, bs1 = mean_std([r["best_top1"] for r in rows])
            b5, bs5 = mean_std([r["best_top5"] for r in rows])
            entry.update(best_top1_mean=b1, best_top1_std=bs1, best_top5_mean=b5, best_top5_std=bs5,
                         best_epochs=sorted(r["best_epoch"] for r in rows),
                         scored_epochs=max(r["scored_epochs"] for r in rows))
        accuracy.append(entry)
    made_from = lineage(storage)
    diversity_rows = sorted(_combined(storage, DIVERSITY_PREFIX), key=lambda d: order.get(d["set"], len(order)))
    per_class = {}
    for d in diversity_rows:
        per_class[d["set"]] = _output_table(storage, DIVERSITY_PREFIX, d)
    diversity = []
    for d in diversity_rows:
        vals = [r["mean_cosine"] for r in per_class[d["set"]]]
        diversity.append({"set": d["set"], "network": d["network"], "mean_cosine": d["mean_cosine"],
                          "min_class": min(vals), "max_class": max(vals)})
    teachers = [{"teacher": r["teacher"], "arch": r["arch"], "val_top1": r["val_top1"], "train_images":
                 r["train_images"], "seconds": r["seconds"]} for r in _combined(storage, "squeeze")]
    set_names = sorted({r["set"] for r in results}, key=lambda n: order[n])
    return {"name": cfg["run"]["name"], "config": cfg, "ipc": cfg["recover"]["ipc"], "results": results,
            "accuracy": accuracy, "paired": paired_comparisons(results, cfg["recover"]["name"]),
            "diversity": diversity, "diversity_per_class": per_class,
            "retention": retention(storage, [n for n in set_names if n != REAL]), "teachers": teachers,
            "imported": imported_sets(storage, cfg, imported), "compute": compute_by_stage(storage),
            "lineage": made_from}


def imported_sets(storage: Storage, cfg: dict, names: list[str]) -> list[dict]:
    """Per imported set: where it came from, what made it, its images per class and how many were converted."""
    out = []
    for name in names:
        s = read_summary(storage, name)
        if s is None:
            continue
        out.append({"set": name, "method": cfg["baselines"]["imported"][name].get("method") or "",
                    "uri": s["uri"], "format": s["format"], "class_rule": s["class_rule"], "images": s["images"],
                    "classes": s["classes"], "declared_ipc": s["declared_ipc"], "ipc_min": s["ipc_min"],
                    "ipc_max": s["ipc_max"], "converted": s["converted"], "sizes": s["sizes"]})
    return out


def paired_comparisons(results: list[dict], method: str) -> list[dict]:
    """Per student architecture, `method` minus each other set, seed by seed (the same student seed trains
    on both sets), with the mean difference and its 95 % t interval."""
    top1: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in results:
        top1[(r["set"], r["student"])][r["seed"]] = r["top1"]
    out = []
    students = list(dict.fromkeys(r["student"] for r in results))
    others = list(dict.fromkeys(r["set"] for r in results if r["set"] != method))
    for student in students:
        if (method, student) not in top1:
            continue
        for other in others:
            d = paired_difference(top1[(method, student)], top1.get((other, student), {}))
            if d is not None:
                out.append({"method": method, "baseline": other, "student": student, **d})
    return out


def retention(storage: Storage, sets: list[str]) -> list[dict]:
    """Per synthetic set: how much of its real initial images the images keep (the recover manifest's
    init_ssim, with what it compared them to) and the primary's final cross-entropy on them (CE
    convergence); the random-real set, which has neither, is left out."""
    out = []
    for s in sets:
        rows = [r for r in _combined(storage, recover_prefix(s)) if r.get("loss_ce") is not None]
        if not rows:
            continue
        values = [r["init_ssim"] for r in rows if r.get("init_ssim") is not None]
        mean, std = mean_std(values) if values else (None, None)
        refs = sorted({r["init_ssim_ref"] for r in rows if r.get("init_ssim_ref")})
        out.append({"set": s, "reference": ",".join(refs) or None, "images": len(rows), "mean": mean, "std": std,
                    "min": min(values) if values else None, "max": max(values) if values else None,
                    "loss_ce": mean_std([r["loss_ce"] for r in rows])[0]})
    return out


def compute_by_stage(storage: Storage) -> list[dict]:
    """Units and summed unit seconds of every completed stage (the work, not the wall time)."""
    from prism_ray.status import stage_prefixes
    out = []
    for prefix in stage_prefixes(storage):
        rows = _combined(storage, prefix)
        if not rows:
            continue
        seconds = 0.0
        for r in rows:
            seconds += float(r.get("seconds") or r.get("train_seconds") or 0.0)
        out.append({"stage": prefix, "units": len({r["shard_id"] for r in rows}), "rows": len(rows),
                    "seconds": seconds})
    return out


def _pm(a: dict, key: str) -> str:
    return f"{100 * a[key + '_mean']:.2f} ± {100 * a[key + '_std']:.2f}"


def accuracy_table(figures: dict) -> str:
    """Final top-1/top-5 (after the last epoch) and, where students were scored during training
    (evaluate.eval_every), the best top-1 of the scored epochs with that epoch's top-5."""
    best = any("best_top1_mean" in a and a["scored_epochs"] > 1 for a in figures["accuracy"])
    head = "| set | student | final top-1 (%) | final top-5 (%) |" + (" best top-1 (%) | its top-5 (%) | at epoch |"
                                                                       if best else "") + " seeds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a in figures["accuracy"]:
        cells = [a["set"], a["student"], _pm(a, "top1"), _pm(a, "top5")]
        if best:
            cells += [_pm(a, "best_top1"), _pm(a, "best_top5"), ", ".join(map(str, a["best_epochs"]))] \
                if "best_top1_mean" in a else ["", "", ""]
        lines.append("| " + " | ".join(cells) + f" | {len(a['seeds'])} |")
    return "\n".join(lines)


def accuracy_note(figures: dict) -> str:
    """Which accuracy the tables show: final, and best of which epochs."""
    every = figures["config"]["evaluate"].get("eval_every", 0)
    epochs = figures["config"]["evaluate"]["epochs"]
    if not every:
        return f"Final: scored once, after the last of {epochs} epochs. The paired comparison uses final top-1."
    return (f"Final: after the last of {epochs} epochs. Best: the highest top-1 over the epochs scored (after "
            f"epoch e, 0-based, when e % {every} == 0, and after the last: the references' rule, whose best "
            f"checkpoint is their `model_best`), with that epoch's top-5 and number of epochs trained per seed. "
            f"A best of several noisy scores is biased upwards; the paired comparison uses final top-1.")


def diversity_table(figures: dict) -> str:
    if not figures["diversity"]:
        return "(no diversity figures)"
    net = figures["diversity"][0]["network"]
    lines = [f"Mean pairwise cosine similarity of {net} penultimate features within each class "
             f"(lower = more diverse):", "", "| set | mean over classes | least diverse class | most diverse class |",
             "|---|---|---|---|"]
    for d in figures["diversity"]:
        lines.append(f"| {d['set']} | {_cosine(d['mean_cosine'])} | {_cosine(d['max_class'])} | "
                     f"{_cosine(d['min_class'])} |")
    if any(math.isnan(d["mean_cosine"]) for d in figures["diversity"]):
        lines += ["", "n/a: the set has one image per class, so no pair to compare."]
    return "\n".join(lines)


def _cosine(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def accuracy_matrix(figures: dict) -> str:
    """Top-1 by set (rows) and student architecture (columns): the cross-architecture view."""
    students = list(dict.fromkeys(a["student"] for a in figures["accuracy"]))
    sets = list(dict.fromkeys(a["set"] for a in figures["accuracy"]))
    cell = {(a["set"], a["student"]): a for a in figures["accuracy"]}
    lines = ["| set | " + " | ".join(students) + " |", "|---|" + "---|" * len(students)]
    for s in sets:
        cells = [f"{100 * cell[(s, st)]['top1_mean']:.2f} ± {100 * cell[(s, st)]['top1_std']:.2f}"
                 if (s, st) in cell else "" for st in students]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(figures: dict) -> str:
    if not figures["paired"]:
        return "(no baseline to compare with)"
    lines = ["Top-1 of the method minus the baseline, per student seed (the same seed trains a student of the "
             "same initial weights on each set); mean and 95 % t interval (n - 1 degrees of freedom), in points:",
             "", "| comparison | student | seeds | per-seed differences | mean | 95 % interval |",
             "|---|---|---|---|---|---|"]
    for p in figures["paired"]:
        diffs = ", ".join(f"{100 * d:+.2f}" for d in p["diffs"])
        interval = f"[{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]" if p["low"] is not None else "(one seed)"
        lines.append(f"| {p['method']} − {p['baseline']} | {p['student']} | {p['n']} | {diffs} | "
                     f"{100 * p['mean']:+.2f} | {interval} |")
    return "\n".join(lines)


def imported_table(figures: dict) -> str:
    lines = ["Sets made elsewhere, indexed and checked when the run imported them, then relabelled and evaluated "
             "with the run's own protocol (docs/sets.md):", "",
             "| set | made by | source | images | IPC per class (declared) | classes by | converted to the run's "
             "size |",
             "|---|---|---|---|---|---|---|"]
    for s in figures["imported"]:
        ipc = f"{s['ipc_min']}" if s["ipc_min"] == s["ipc_max"] else f"{s['ipc_min']}-{s['ipc_max']}"
        sizes = ", ".join(s["sizes"])
        lines.append(f"| {s['set']} | {s['method']} | {s['uri']} ({s['format']}) | {s['images']} | {ipc} "
                     f"({s['declared_ipc']}) | {'name' if s['class_rule'] == 'names' else 'number'} | "
                     f"{s['converted']} (found {sizes}) |")
    return "\n".join(lines)


def retention_table(figures: dict) -> str:
    if not figures["retention"]:
        return "(no retention figures: the recover manifests have no init_ssim column)"
    lines = ["SSIM between each synthetic image and the k-th real training image of its class (k = its IPC "
             "index): the image it started from for real init (`init`); for noise init (`kth_real`) an image "
             "it never saw, the level of no retention. 1 = unchanged. Final CE: the primary's cross-entropy on "
             "the images at the last iteration (CE convergence).", "",
             "| set | compared with | images | mean SSIM | std | min | max | final CE |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"
    for r in figures["retention"]:
        lines.append(f"| {r['set']} | {r['reference'] or ''} | {r['images']} | {f(r['mean'])} | {f(r['std'])} | "
                     f"{f(r['min'])} | {f(r['max'])} | {r['loss_ce']:.4f} |")
    return "\n".join(lines)


def headline(figures: dict) -> list[str]:
    """Per student architecture, one line: the method's top-1 and the method minus each baseline (paired by seed,
    with the 95 % interval), the numbers a run is for."""
    paired, accuracy = figures["paired"], figures["accuracy"]
    method = paired[0]["method"] if paired else accuracy[0]["set"] if accuracy else None
    lines = []
    for a in accuracy:
        if a["set"] != method:
            continue
        parts = [f"{method} top-1 {100 * a['top1_mean']:.2f} %"]
        for p in paired:
            if p["student"] == a["student"]:
                interval = f" [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]" if p["low"] is not None else ""
                parts.append(f"{method} − {p['baseline']} {100 * p['mean']:+.2f} points{interval}")
        lines.append(f"{a['student']} student, {len(a['seeds'])} seeds: " + "; ".join(parts))
    return lines


def lineage_table(figures: dict) -> str:
    """Each evaluate stage and what it was made from (generation / config digest), as checked when reporting."""
    rows = figures.get("lineage") or []
    if not rows:
        return "(no lineage recorded)"
    lines = ["Every output below was made from exactly these upstream outputs (generation / config digest; checked "
             "against the run when this report was written):", "", "| stage | generation / config | made from |",
             "|---|---|---|"]
    for r in rows:
        ups = ", ".join(f"{u} {v['generation']} / {v['config']}" if v else f"{u} (none)"
                        for u, v in r["upstream"].items())
        lines.append(f"| {r['stage']} | {r['generation']} / {r['config']} | {ups} |")
    return "\n".join(lines)


def markdown(figures: dict) -> str:
    cfg = figures["config"]
    d, e = cfg["data"], cfg["evaluate"]
    parts = [f"# prism-ray report: {figures['name']}", "",
             f"Data: {d['dataset']} ({d['channels']}x{d['resolution']}x{d['resolution']}), IPC {cfg['recover']['ipc']}, "
             f"labels {cfg['relabel']['mode']} from {', '.join(cfg['relabel']['teachers']) or cfg['recover']['primary']}, "
             f"students trained {e['epochs']} epochs ({e['loss']}, {e['optimizer']} lr {e['lr']}, "
             f"{e.get('schedule', 'cosine')} schedule, batch {e['batch_size']} in {e.get('accumulation_steps', 1)} "
             f"micro-batch(es), {e.get('precision', 'fp32')}).", "",
             "## Accuracy on the real validation set (mean ± std over seeds)", "", accuracy_note(figures), "",
             accuracy_table(figures), ""]
    if len({a["student"] for a in figures["accuracy"]}) > 1:
        parts += ["Final top-1 (%) by set and student architecture:", "", accuracy_matrix(figures), ""]
    if figures.get("imported"):
        parts += ["## Imported sets", "", imported_table(figures), ""]
    parts += ["## Paired comparison", "", paired_table(figures), "",
             "## Diversity", "", diversity_table(figures), "", "![per-class diversity](diversity.png)", "",
             "## Real-init retention", "", retention_table(figures), "",
             "## Samples (first image of each class per set)", "", "![samples](samples.png)", ""]
    if figures["teachers"]:
        parts += ["## Teachers (squeeze)", "", "| teacher | arch | val top-1 (%) | train images | seconds |",
                  "|---|---|---|---|---|"]
        parts += [f"| {t['teacher']} | {t['arch']} | {100 * t['val_top1']:.2f} | {t['train_images']} | "
                  f"{t['seconds']:.1f} |" for t in figures["teachers"]]
        parts.append("")
    parts += ["## Lineage", "", lineage_table(figures), ""]
    parts += ["## Compute (sum of unit times, all workers)", "", "| stage | units | seconds |", "|---|---|---|"]
    parts += [f"| {c['stage']} | {c['units']} | {c['seconds']:.1f} |" for c in figures["compute"]]
    return "\n".join(parts) + "\n"


def sample_grid(storage: Storage, sets: list[str], max_classes: int = 10, scale_to: int = 64) -> bytes:
    """One row per set: the ipc-0 image of the first classes, upscaled so small images stay visible."""
    label_w, pad = 110, 4
    rows = []
    for s in sets:
        store = ShardStore(storage, recover_prefix(s))
        table = _combined(storage, recover_prefix(s))
        picks = sorted((r for r in table if r["ipc_index"] == 0), key=lambda r: r["class_id"])[:max_classes]
        rows.append((s, [Image.open(io.BytesIO(store.read_output(r))).convert("RGB") for r in picks]))
    cols = max((len(r[1]) for r in rows), default=1)
    grid = Image.new("RGB", (label_w + cols * (scale_to + pad), len(rows) * (scale_to + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, images) in enumerate(rows):
        y = pad + i * (scale_to + pad)
        draw.text((4, y + scale_to // 2 - 6), name, fill="black")
        for j, im in enumerate(images):
            grid.paste(im.resize((scale_to, scale_to), Image.NEAREST), (label_w + j * (scale_to + pad), y))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def diversity_plot(per_class: dict[str, list[dict]], width_per_bar: int = 9) -> bytes:
    """Grouped bars: per class, each set's mean pairwise cosine similarity (0 to 1 axis)."""
    sets = list(per_class)
    classes = sorted({r["class_id"] for rows in per_class.values() for r in rows})
    h, top, left, bottom = 260, 30, 50, 40
    group_w = width_per_bar * len(sets) + 8
    w = left + group_w * len(classes) + 20
    legend_h = 18 * len(sets)
    img = Image.new("RGB", (max(w, 320), h + top + bottom + legend_h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), "mean pairwise cosine similarity per class (lower = more diverse)", fill="black")
    for tick in range(0, 11, 2):
        y = top + h - int(h * tick / 10)
        draw.line((left - 4, y, w - 10, y), fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick / 10:.1f}", fill="black")
    for ci, c in enumerate(classes):
        x0 = left + ci * group_w
        for si, s in enumerate(sets):
            value = next((r["mean_cosine"] for r in per_class[s] if r["class_id"] == c), None)
            if value is None or value != value:  # missing or nan
                continue
            x = x0 + si * width_per_bar
            y = top + h - int(h * max(0.0, min(1.0, value)))
            draw.rectangle((x, y, x + width_per_bar - 2, top + h), fill=PALETTE[si % len(PALETTE)])
        draw.text((x0, top + h + 4), str(c), fill="black")
    for si, s in enumerate(sets):
        y = top + h + bottom + 18 * si
        draw.rectangle((left, y, left + 12, y + 12), fill=PALETTE[si % len(PALETTE)])
        draw.text((left + 18, y), s, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Columns of a student's manifest row that describe the machine, not the result (times, retries, memory, where the
# set was held, which follows the memory free, and the attempt that wrote the weights with its key): left out of
# results.parquet, so that a run repeated with the same seed gives the same results table byte for byte.
MACHINE_COLUMNS = ("train_seconds", "storage_retries", "peak_rss_bytes", "holding", "attempt", "path")


def archive_other_ipc(storage: Storage, ipc: int) -> None:
    """A report made at another IPC (the run has grown since) moves to report/ipc<N>/, so it is not lost."""
    try:
        old = storage.read_json(f"{REPORT}/report.json").get("ipc")
    except FileNotFoundError:
        return
    if old is None or old == ipc:
        return
    for key in storage.list(REPORT):
        name = key.rsplit("/", 1)[-1]
        if "." in name:  # files only; earlier archives are folders
            storage.write_bytes(f"{REPORT}/ipc{old}/{name}", storage.read_bytes(key))
            storage.delete(key)


def write_report(storage: Storage) -> dict:
    figures = collect(storage)
    archive_other_ipc(storage, figures["ipc"])
    results = [{k: v for k, v in r.items() if k not in MACHINE_COLUMNS} for r in figures["results"]]
    storage.write_table(f"{REPORT}/results.parquet", pa.Table.from_pylist(results))
    storage.write_bytes(f"{REPORT}/report.md", markdown(figures).encode())
    storage.write_json(f"{REPORT}/report.json", {k: v for k, v in figures.items() if k not in ("config",)})
    sets = list(dict.fromkeys(a["set"] for a in figures["accuracy"]))
    storage.write_bytes(f"{REPORT}/samples.png", sample_grid(storage, sets))
    if figures["diversity_per_class"]:
        storage.write_bytes(f"{REPORT}/diversity.png", diversity_plot(figures["diversity_per_class"]))
    return figures


def print_report(storage: Storage, as_json: bool = False, stream=None) -> int:
    stream = stream or sys.stdout
    figures = collect(storage)
    if as_json:
        print(json.dumps({k: figures[k] for k in ("accuracy", "paired", "diversity", "retention", "teachers",
                                                  "imported", "compute", "lineage")}, indent=2), file=stream)
        return 0
    tables = [accuracy_note, accuracy_table, *([imported_table] if figures["imported"] else []), paired_table,
              diversity_table, retention_table, lineage_table]
    for table in tables:
        print(table(figures), file=stream)
        print("", file=stream)
    return 0


__all__ = ["REAL", "collect", "headline", "write_report", "print_report"]
