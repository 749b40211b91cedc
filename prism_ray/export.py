"""`prism-ray export RUN --set NAME --to URI --format imagefolder|parquet`: one set of a run, in a form people
train from, with its provenance.

- imagefolder: ``<class folder>/<class id>_ipc<k>.<ext>``, the committed files byte for byte. Folders are the
  data set's class names (``/`` written ``_``), prefixed with the class number (``007_Sneaker``) when the
  names do not sort in class order, so torchvision's `ImageFolder` gives every image its data set label.
- parquet: ``data/train-00000-of-0000N.parquet``, columns ``image`` (struct of ``bytes`` and ``path``, the
  committed files), ``label`` and ``ipc_index``, with the ``huggingface`` schema metadata that makes
  `datasets` read ``image`` as an `Image` feature and ``label`` as a `ClassLabel` with the class names.
- both: ``classes.json`` (class names and folders, in class-id order); with ``--soft-labels`` the run's stored
  soft labels of the set under ``soft_labels/`` (the relabel shards as stored: per epoch and position, the
  image index in the export's order, crop box, flip, CutMix partner, box and ratio, and the teachers' fp16
  logits); and ``README.md`` last, a dataset card: method, config digest, teachers, IPC, the run's measured
  accuracies. An export without its README.md was interrupted.

Rows and files are in the set's order, (class id, IPC index): the order the soft labels index into. Every file
is checked against its manifest checksum as it is copied. Importing an export back (`baselines.imported`) gives
the same bytes and labels.
"""
from __future__ import annotations

import io
import json
import posixpath
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from prism_ray.data.set_source import export_folder_names
from prism_ray.runs import RUN_RECORD
from prism_ray.stages.base import StageError
from prism_ray.stages.evaluate import DIVERSITY_PREFIX, STUDENTS_PREFIX
from prism_ray.stages.image_sets import set_manifest_rows, verified_chunks
from prism_ray.stages.imported import read_summary
from prism_ray.stages.relabel import RELABEL_PREFIX
from prism_ray.stats import mean_std
from prism_ray.storage import ShardStore, Storage, sha256

FORMATS = ("imagefolder", "parquet")
SHARD_BYTES = 256 << 20  # image bytes per Parquet file
ROW_GROUP = 100  # rows per Parquet row group: what Hugging Face advises for images (streaming reads few at once)
CARD, CLASSES, SOFT_LABELS = "README.md", "classes.json", "soft_labels"


def file_name(row: dict) -> str:
    ext = posixpath.splitext(row["path"])[1]
    return f"{row['class_id']:05d}_ipc{row['ipc_index']:04d}{ext}"


def hf_features(class_names: list[str]) -> dict:
    return {"image": {"_type": "Image"}, "label": {"names": list(class_names), "_type": "ClassLabel"},
            "ipc_index": {"dtype": "int32", "_type": "Value"}}


def shards(rows: list[dict], limit: int = SHARD_BYTES) -> list[list[dict]]:
    """Consecutive rows grouped into files of at most `limit` image bytes (at least one row each)."""
    out: list[list[dict]] = [[]]
    size = 0
    for r in rows:
        if out[-1] and size + r["bytes"] > limit:
            out.append([])
            size = 0
        out[-1].append(r)
        size += r["bytes"]
    return out


def export_set(run: Storage, set_name: str, target: Storage, fmt: str, soft_labels: bool = False,
               say=None) -> dict:
    """Write set `set_name` of the run at `run` to `target` (an empty folder or prefix); returns what was written."""
    if fmt not in FORMATS:
        raise StageError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not run.exists(RUN_RECORD):
        raise StageError(f"no prism-ray run at {run.uri()} (no {RUN_RECORD})")
    record = run.read_json(RUN_RECORD)
    class_names = list(record["context"]["class_names"])
    store, rows = set_manifest_rows(run, set_name)
    existing = [k for k in target.list("") if not posixpath.basename(k).startswith(".")]
    if existing:
        raise StageError(f"--to {target.uri()} already holds files ({', '.join(existing[:3])}); export into an empty "
                         f"or new location")
    labels = soft_label_rows(run, set_name) if soft_labels else []
    folders = export_folder_names(class_names)
    written: list[str] = []
    if fmt == "imagefolder":
        for start, blobs in verified_chunks(store, rows):
            for r, blob in zip(rows[start:start + len(blobs)], blobs):
                key = f"{folders[r['class_id']]}/{file_name(r)}"
                target.write_bytes(key, blob)
                written.append(key)
    else:
        parts = shards(rows)
        for i, part in enumerate(parts):
            key = f"data/train-{i:05d}-of-{len(parts):05d}.parquet"
            target.write_bytes(key, parquet_shard(store, part, class_names, folders))
            written.append(key)
    for r in labels:
        key = f"{SOFT_LABELS}/{set_name}-epochs-{r['epoch_start']:04d}-{r['epoch_stop'] - 1:04d}.parquet"
        blob = ShardStore(run, RELABEL_PREFIX).read_output(r)  # checked against its manifest's sha256
        target.write_bytes(key, blob)
        written.append(key)
    target.write_json(CLASSES, {"names": class_names, "folders": folders})
    card = dataset_card(run, record, set_name, rows, fmt, folders, labels)
    target.write_bytes(CARD, card.encode())
    if say:
        say(f"exported set {set_name}: {len(rows):,} images ({fmt}) and {len(labels)} soft label file(s) -> "
            f"{target.uri()}")
    return {"set": set_name, "format": fmt, "images": len(rows), "files": written + [CLASSES, CARD],
            "soft_label_files": len(labels)}


def parquet_shard(store: ShardStore, rows: list[dict], class_names: list[str], folders: list[str]) -> bytes:
    images, labels, ipcs = [], [], []
    for start, blobs in verified_chunks(store, rows):
        for r, blob in zip(rows[start:start + len(blobs)], blobs):
            images.append({"bytes": blob, "path": f"{folders[r['class_id']]}/{file_name(r)}"})
            labels.append(r["class_id"])
            ipcs.append(r["ipc_index"])
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64()), ("ipc_index", pa.int32())],
                       metadata={"huggingface": json.dumps({"info": {"features": hf_features(class_names)}})})
    table = pa.Table.from_pydict({"image": images, "label": labels, "ipc_index": ipcs}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP)
    return buf.getvalue()


def soft_label_rows(run: Storage, set_name: str) -> list[dict]:
    """The relabel manifest's rows of the set's label files, in epoch order."""
    try:
        table = ShardStore(run, RELABEL_PREFIX).read_combined()
    except FileNotFoundError:
        raise StageError(f"{run.uri()} has no complete stored soft labels (relabel.mode live, or the relabel stage "
                         f"has not finished); export without --soft-labels") from None
    rows = [r for r in table.to_pylist() if r.get("set") == set_name]
    if not rows:
        raise StageError(f"{run.uri(RELABEL_PREFIX)} holds no soft labels of set {set_name!r}")
    return sorted(rows, key=lambda r: r["epoch_start"])


# ---------------------------------------------------------------------------------------------- the card


def config_digest(cfg: dict) -> str:
    """sha256 of the run's resolved config as recorded in run.json (secrets redacted), keys sorted."""
    return sha256(json.dumps(cfg, sort_keys=True, default=str).encode())


def _teacher_line(cfg: dict, name: str) -> str:
    spec = next((t for t in cfg["teachers"]["models"] if t["name"] == name), None)
    return f"{name} ({spec['arch']}, weights {spec['weights']})" if spec else name


def method_lines(run: Storage, cfg: dict, set_name: str) -> list[str]:
    """What made the set and with which teachers, from the run's recorded config."""
    if set_name == cfg["recover"]["name"] or set_name in cfg["baselines"]["recover"]:
        rc = cfg["recover"] if set_name == cfg["recover"]["name"] else cfg["baselines"]["recover"][set_name]
        extra = rc["fixed"] if rc["selection"] == "fixed" else rc["bn_pool"]
        drawn = "per shard" if rc["selection"] == "pre" else "per iteration"
        how = ("every step" if rc["selection"] == "fixed" else
               f"{rc['slots']} slots each filled with p={rc['slot_prob']}, drawn {drawn}")
        preset = f", preset {rc['preset']}" if rc.get("preset") else ""
        return [f"- **method**: recover by prism-ray (`{set_name}`{preset}): {rc['iterations']} iterations "
                f"({rc['schedule']}), lr {rc['lr']}, r_bn {rc['r_bn']}, init {rc['init']}",
                f"- **primary teacher**: {_teacher_line(cfg, rc['primary'])}",
                f"- **BN teachers**: the primary, and {', '.join(_teacher_line(cfg, n) for n in extra)} ({how})"
                if extra else "- **BN teachers**: the primary alone"]
    if set_name == "random_real":
        return ["- **method**: a seeded random subset of the real training images (the random-real baseline)"]
    summary = read_summary(run, set_name) or {}
    imported = cfg["baselines"].get("imported", {}).get(set_name, {})
    what = imported.get("method") or "not stated"
    uri = summary.get("uri", imported.get("uri"))
    return [f"- **method**: imported into prism-ray from `{uri}` (made by: {what}); {summary.get('converted', 0)} "
            f"image(s) converted to the run's size"]


def accuracy_lines(run: Storage, set_name: str, cfg: dict) -> list[str]:
    try:
        results = [r for r in ShardStore(run, STUDENTS_PREFIX).read_combined().to_pylist() if r["set"] == set_name]
    except FileNotFoundError:
        results = []
    if not results:
        return ["(the run has no complete evaluation of this set)"]
    e = cfg["evaluate"]
    by_student = defaultdict(list)
    for r in results:
        by_student[r["student"]].append(r)
    lines = [f"Students trained on this set with the run's soft labels ({cfg['relabel']['mode']}, teachers "
             f"{', '.join(cfg['relabel']['teachers']) or cfg['recover']['primary']}), {e['epochs']} epochs "
             f"({e.get('recipe') or 'custom'} recipe, {e['loss']}, {e['optimizer']} lr {e['lr']}), scored on the real "
             f"validation set ({results[0].get('val_images', '?')} images):", "",
             "| student | top-1 (%) | top-5 (%) | seeds |", "|---|---|---|---|"]
    for student, rows in by_student.items():
        t1, s1 = mean_std([r["top1"] for r in rows])
        t5, s5 = mean_std([r["top5"] for r in rows])
        lines.append(f"| {student} | {100 * t1:.2f} ± {100 * s1:.2f} | {100 * t5:.2f} ± {100 * s5:.2f} | "
                     f"{len(rows)} |")
    return lines


def dataset_card(run: Storage, record: dict, set_name: str, rows: list[dict], fmt: str, folders: list[str],
                 labels: list[dict]) -> str:
    cfg = record["config"]
    class_names = record["context"]["class_names"]
    per_class = defaultdict(int)
    for r in rows:
        per_class[r["class_id"]] += 1
    counts = [per_class[c] for c in range(len(class_names))]
    ipc = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    d = cfg["data"]
    label_teachers = cfg["relabel"]["teachers"] or [cfg["recover"]["primary"]]
    front = (["---", f"pretty_name: {cfg['run']['name']} {set_name}", "configs:", "- config_name: default",
              "  data_files:", "  - split: train", "    path: data/*.parquet", "---", ""] if fmt == "parquet" else [])
    try:
        diversity = next((r for r in ShardStore(run, DIVERSITY_PREFIX).read_combined().to_pylist()
                          if r["set"] == set_name), None)
    except FileNotFoundError:
        diversity = None
    lines = front + [
        f"# {set_name}: a distilled image set from the prism-ray run {cfg['run']['name']}", "",
        *method_lines(run, cfg, set_name),
        f"- **images**: {len(rows):,} in {len(class_names)} classes, IPC {ipc}",
        f"- **data**: {d['dataset']}, {d['channels']} channel(s) at {d['resolution']} px; class names in class-id "
        f"order in `{CLASSES}`",
        f"- **soft-label teachers (relabel)**: {', '.join(_teacher_line(cfg, n) for n in label_teachers)} "
        f"({cfg['relabel']['ensemble']} ensemble)",
        f"- **run**: seed {cfg['run']['seed']}; config digest sha256:{config_digest(cfg)} (of the resolved config "
        f"recorded in the run's run.json)", ""]
    lines += ["## Accuracy in the run", "", *accuracy_lines(run, set_name, cfg), ""]
    if diversity:
        lines += [f"Diversity: mean pairwise cosine similarity of {diversity['network']} features within a class, "
                  f"{diversity['mean_cosine']:.4f} (lower is more diverse).", ""]
    lines += ["## Files", ""]
    if fmt == "imagefolder":
        lines += [f"One folder per class (`{folders[0]}`, ...), files `<class id>_ipc<k>.<ext>` as the run committed "
                  f"them. torchvision: `datasets.ImageFolder(path)`; its class indices are the data set's class ids "
                  f"(the folders sort in class order).", ""]
    else:
        lines += ["`data/*.parquet`: columns `image` (struct of `bytes` and `path`), `label` (ClassLabel with the "
                  "class names) and `ipc_index`. Hugging Face: `datasets.load_dataset('parquet', data_files="
                  "'data/*.parquet')` or `Dataset.from_parquet`.", ""]
    if labels:
        lines += [f"`{SOFT_LABELS}/*.parquet`: the run's stored soft labels, {len(labels)} file(s) covering epochs "
                  f"{labels[0]['epoch_start']}-{labels[-1]['epoch_stop'] - 1}: one row per epoch and position with "
                  f"`image` (the row of this set in (class, IPC) order, the order of the files above), `crop` (top, "
                  f"left, height, width), `flip`, `partner`, `mix_box`, `mix_lam` (CutMix) and `logits` (fp16; or "
                  f"`topk_values` and `topk_indices`). Mix group {cfg['relabel']['mix_group']}, crop scale "
                  f"{cfg['relabel']['crop_scale']}.", ""]
    return "\n".join(lines)

