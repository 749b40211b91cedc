"""The sweep's table: one row per point x set x student from the points' records (results/<point>.json), written as
sweep.parquet and sweep.md."""
from __future__ import annotations

import pyarrow as pa

from prism_ray.stats import paired_difference
from prism_ray.storage import ShardStore, Storage
from prism_ray.sweep.grid import TEACHERS_RUN, Sweep, _short


def record_key(name: str) -> str:
    return f"results/{name}.json"



def table_rows(records: list[dict]) -> list[dict]:
    """One row per point x set x student: accuracy, the method minus this set (paired, 95 % interval), this
    set minus the same set at the first point (paired by student seed across runs: a seed starts from the
    same weights in every point of one run seed), within-class cosine, real-init retention, final CE, cost."""
    def per_seed(rec: dict) -> dict[tuple[str, str], dict[int, float]]:
        out: dict[tuple[str, str], dict[int, float]] = {}
        for r in rec.get("top1", []):
            out.setdefault((r["set"], r["student"]), {})[r["seed"]] = r["top1"]
        return out

    reference = per_seed(records[0]) if records else {}
    same_seed_root = {rec["config"]["run"]["seed"] for rec in records}
    rows = []
    for rec in records:
        seeds = per_seed(rec)
        method = rec["config"]["recover"]["name"]
        cosine = {d["set"]: d["mean_cosine"] for d in rec["diversity"]}
        keep = {r["set"]: r for r in rec["retention"]}
        paired = {(p["baseline"], p["student"]): p for p in rec["paired"]}
        recover_seconds = {c["stage"].split("/", 1)[-1]: c["seconds"] for c in rec["compute"]
                           if c["stage"].startswith("recover/")}
        for a in rec["accuracy"]:
            p = paired.get((a["set"], a["student"]))
            key = (a["set"], a["student"])
            vs_first = None
            if rec is not records[0] and len(same_seed_root) == 1 and key in reference:
                vs_first = paired_difference(seeds.get(key, {}), reference[key])
            rows.append({
                "point": rec["name"], "changes": rec["changes"], "ipc": rec["ipc"], "set": a["set"],
                "student": a["student"], "seeds": len(a["seeds"]), "top1_mean": a["top1_mean"],
                "top1_std": a["top1_std"], "top5_mean": a["top5_mean"], "top5_std": a["top5_std"],
                "method": method, "method_minus_set": p["mean"] if p else None,
                "method_minus_set_low": p["low"] if p else None, "method_minus_set_high": p["high"] if p else None,
                "first_point": records[0]["name"], "minus_first": vs_first["mean"] if vs_first else None,
                "minus_first_low": vs_first["low"] if vs_first else None,
                "minus_first_high": vs_first["high"] if vs_first else None,
                "mean_cosine": cosine.get(a["set"]),
                "init_ssim": keep[a["set"]]["mean"] if a["set"] in keep else None,
                "init_ssim_ref": keep[a["set"]]["reference"] if a["set"] in keep else None,
                "loss_ce": keep[a["set"]]["loss_ce"] if a["set"] in keep else None,
                "recover_seconds": recover_seconds.get(a["set"]), "point_seconds": rec["seconds"]})
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.2f}"


def markdown(sweep: Sweep, rows: list[dict], teachers: list[dict]) -> str:
    lines = [f"# Sweep {sweep.name}", "",
             f"Base config `{sweep.base_path}`; every point: "
             + (", ".join(f"`{k}={_short(v)}`" for k, v in sweep.common.items()) or "no common overrides") + ".",
             f"Points run: {len({r['point'] for r in rows})} of {len(sweep.points)}"
             + (f"; left out as duplicates: {', '.join(sweep.dropped)}" if sweep.dropped else "") + ".", ""]
    if teachers:
        lines += ["Shared teachers (squeeze, once): " + ", ".join(
            f"{t['teacher']} ({t['arch']}) {100 * t['val_top1']:.1f} %" for t in teachers) + ".", ""]
    lines += ["Top-1 on the real validation set (mean ± std over student seeds, in %); Δ method − set: the method "
              "minus this set within the point, paired by student seed, with its 95 % t interval, in points; Δ vs "
              "the first point: this set and student minus the same at the first point, paired by seed; cosine = mean within-class cosine similarity "
              "of the primary's features (lower = more diverse); init SSIM = SSIM to the k-th real image of "
              "the class (the image it started from for real init; for noise init, a no-retention level); final CE = "
              "the primary's mean cross-entropy on the set's images at the last recover iteration.", "",
              "| point | changes | set | student | top-1 (%) | Δ method − set [95 % CI] | Δ vs "
              f"{rows[0]['first_point'] if rows else 'first point'} [95 % CI] | cosine | init SSIM | final CE | "
              "recover s | point min |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def delta(r: dict, key: str) -> str:
        if r[key] is None:
            return ""
        text = _pct(r[key])
        if r[f"{key}_low"] is not None:
            text += f" [{_pct(r[f'{key}_low'])}, {_pct(r[f'{key}_high'])}]"
        return text

    for r in rows:
        cosine = "" if r["mean_cosine"] is None else f"{r['mean_cosine']:.4f}"
        kept = "" if r["init_ssim"] is None else f"{r['init_ssim']:.3f} ({r['init_ssim_ref']})"
        ce = "" if r["loss_ce"] is None else f"{r['loss_ce']:.3f}"
        recover_s = "" if r["recover_seconds"] is None else f"{r['recover_seconds']:.0f}"
        lines.append(f"| {r['point']} | {r['changes']} | {r['set']} | {r['student']} | {100 * r['top1_mean']:.2f} ± "
                     f"{100 * r['top1_std']:.2f} ({r['seeds']}) | {delta(r, 'method_minus_set')} | "
                     f"{delta(r, 'minus_first')} | {cosine} | {kept} | {ce} | {recover_s} | "
                     f"{r['point_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def write_table(storage: Storage, sweep: Sweep) -> list[dict]:
    """sweep.parquet and sweep.md from the records of the finished points, in the sweep's order."""
    records = []
    for p in sweep.points:
        try:
            records.append(storage.read_json(record_key(p.name)))
        except FileNotFoundError:
            continue
    rows = table_rows(records)
    try:
        teachers = ShardStore(storage, f"{TEACHERS_RUN}/squeeze").read_combined().to_pylist()
    except FileNotFoundError:
        teachers = []
    if rows:
        storage.write_table("sweep.parquet", pa.Table.from_pylist(rows))
    storage.write_bytes("sweep.md", markdown(sweep, rows, teachers).encode())
    return rows
