"""How long `prism-ray status` takes on a run of 500 committed recover shards on S3 (moto server, loopback).

The shards are committed through the real protocol (ShardStore.commit: one image object and one Parquet
manifest each), with the plan of ImageNet-1K at IPC 50 in groups of 100 classes.
Usage: python bench/status_s3.py
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from prism_ray.config import StorageConfig  # noqa: E402
from prism_ray.runs import RUN_RECORD  # noqa: E402
from prism_ray.stages.recover import plan_shards  # noqa: E402
from prism_ray.status import run_status  # noqa: E402
from prism_ray.storage import ShardStore, Storage  # noqa: E402


def main() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    storage = Storage("s3://bench/in1k", StorageConfig(endpoint_url=endpoint))
    units = plan_shards(1000, 50, 100)
    storage.write_json(RUN_RECORD, {"config": {"run": {"name": "bench"}}})
    storage.write_json("recover/prism/plan.json", {"stage": "recover/prism", "kind": "recover", "unit_noun": "shard",
                                                   "units": [u.id for u in units],
                                                   "unit_images": {u.id: 100 for u in units}})
    store = ShardStore(storage, "recover/prism")
    t0 = time.perf_counter()
    for u in units:
        store.commit(u.id, [(f"images/{u.id}.jpg", b"x" * 100)], [{"class_id": 0}])
    commit_s = time.perf_counter() - t0
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        st = run_status(storage)
        timings.append(time.perf_counter() - t0)
    (stage,) = st["stages"]
    assert stage["committed"] == 500 and stage["missing"] == 0
    print(json.dumps({"shards": 500, "commit_seconds_total": round(commit_s, 2),
                      "status_seconds": [round(t, 3) for t in timings]}))
    server.stop()


if __name__ == "__main__":
    main()
