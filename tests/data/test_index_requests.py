"""S3 requests by kind, counted by a proxy in front of moto: once the data index exists, nothing lists the data.

The data lives in its own bucket, apart from the runs; storage.endpoint_url points every process (the
driver and the Ray workers) at the counting proxy.
"""
from __future__ import annotations

import io
import uuid

import boto3
import pytest
import yaml
from PIL import Image

from prism_ray.cli import main
from tests.support.s3_proxy import KINDS, S3RequestCounter, classify

ZERO = dict.fromkeys(KINDS, 0)


@pytest.fixture
def proxy(s3_endpoint):
    with S3RequestCounter(s3_endpoint) as counter:
        yield counter


def _bucket(endpoint: str, kind: str) -> str:
    name = f"{kind}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_classify_kinds():
    assert classify("GET", "/b?list-type=2&prefix=x%2F&delimiter=%2F") == ("LIST", "b", "")
    assert classify("GET", "/b") == ("LIST", "b", "")
    assert classify("GET", "/b?location") == ("GET", "b", "")
    assert classify("GET", "/b/train/a/1.png") == ("GET", "b", "train/a/1.png")
    assert classify("POST", "/b?delete") == ("POST", "b", "")


def test_proxy_counts_each_request_by_bucket_and_kind(proxy, s3_endpoint):
    bucket = _bucket(s3_endpoint, "count")  # made directly: not counted
    s3 = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="a/1", Body=b"one")
    s3.put_object(Bucket=bucket, Key="a/2", Body=b"two")
    assert s3.get_object(Bucket=bucket, Key="a/1")["Body"].read() == b"one"
    assert s3.head_object(Bucket=bucket, Key="a/2")["ContentLength"] == 3
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="a/")["Contents"]] == ["a/1", "a/2"]
    s3.delete_object(Bucket=bucket, Key="a/1")
    assert proxy.counts(bucket) == {**ZERO, "LIST": 1, "GET": 1, "HEAD": 1, "PUT": 2, "DELETE": 1}
    assert proxy.counts("elsewhere") == ZERO
    assert [r[0] for r in proxy.requests(bucket)] == ["PUT", "PUT", "GET", "HEAD", "LIST", "DELETE"]
    proxy.reset()
    assert proxy.counts() == {}


def _upload_image_folder(s3_endpoint: str, bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for split, per_class in (("train", 4), ("val", 2)):
        for c, name in enumerate(("ant", "bee", "cat", "dog")):
            for k in range(per_class):
                buf = io.BytesIO()
                Image.new("RGB", (20 + 2 * k, 18), (50 * c, 40 * k, 120)).save(buf, format="JPEG")
                s3.put_object(Bucket=bucket, Key=f"{split}/{name}/{k}.jpg", Body=buf.getvalue())


def _config(path, data_bucket: str, output: str, endpoint: str) -> str:
    raw = {
        "run": {"name": "requests", "output": output, "seed": 0},
        "data": {"dataset": "image_folder", "train": f"s3://{data_bucket}/train", "val": f"s3://{data_bucket}/val",
                 "channels": 3, "resolution": 16},
        "teachers": {"models": [{"name": "t1", "arch": "convnet", "weights": "squeeze"},
                                {"name": "t2", "arch": "convnet", "weights": "random"}]},
        "squeeze": {"epochs": 1, "batch_size": 8},
        "recover": {"primary": "t1", "bn_pool": ["t2"], "ipc": 2, "class_group": 4, "iterations": 2,
                    "schedule": "flat", "jitter": 1, "image_format": "png"},
        "baselines": {"random_real": True},
        "relabel": {"mode": "stored", "mix_group": 4, "epochs_per_shard": 2},
        "evaluate": {"recipe": "prism", "students": ["convnet"], "seeds": [0], "epochs": 2, "batch_size": 8,
                     "checkpoint_every": 1},
        "storage": {"endpoint_url": endpoint},
        "ray": {"workers": 2, "cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
@pytest.mark.usefixtures("runs_share_kept_workers")
def test_workers_plan_and_status_never_list_the_data(tmp_path, s3_endpoint, proxy, capsys):
    data, runs = _bucket(s3_endpoint, "data"), _bucket(s3_endpoint, "runs")
    _upload_image_folder(s3_endpoint, data)
    cfg = _config(tmp_path / "c.yaml", data, f"s3://{runs}/run", proxy.url)
    shared = f"s3://{runs}/shared-index"
    figures = {}

    # a shared index: the listing of both splits, once (root, then each class folder, per split)
    assert main(["index", cfg, "--out", shared]) == 0
    figures["prism-ray index"] = listing = proxy.counts(data)
    assert listing["LIST"] == 2 * (1 + 4) and listing["PUT"] == listing["DELETE"] == listing["POST"] == 0
    proxy.reset()

    # every stage on Ray with the shared index: the driver and all workers read images, list nothing
    assert main(["run", cfg, "--set", f"data.index={shared}", "--quiet"]) == 0
    figures["run, shared index"] = used = proxy.counts(data)
    assert used["LIST"] == 0, proxy.requests(data, "LIST")
    assert used["GET"] > 0 and used["PUT"] == used["DELETE"] == used["POST"] == 0
    proxy.reset()

    # plan and status read the index and the run: nothing of the data bucket
    assert main(["plan", cfg, "--set", f"data.index={shared}"]) == 0
    assert main(["status", f"s3://{runs}/run", "--endpoint-url", proxy.url]) == 0
    assert proxy.counts(data) == ZERO, proxy.requests(data)

    # without data.index the driver lists once, into the run; a resumed run and plan list nothing
    second = ["--set", f"run.output=s3://{runs}/run2"]
    proxy.reset()
    assert main(["run", cfg, *second, "--set", "run.stages=[squeeze,recover]", "--quiet"]) == 0
    figures["run, own index"] = own = proxy.counts(data)
    assert own["LIST"] == listing["LIST"], proxy.requests(data, "LIST")
    proxy.reset()
    assert main(["recover", cfg, *second, "--fresh", "--quiet"]) == 0
    figures["recover --fresh, resumed"] = resumed = proxy.counts(data)
    assert resumed["LIST"] == 0 and resumed["GET"] > 0, proxy.requests(data, "LIST")
    proxy.reset()
    assert main(["plan", cfg, *second]) == 0
    assert proxy.counts(data) == ZERO

    with capsys.disabled():  # the figures, for docs/storage.md and the rehearsal
        print("\nrequests against the data bucket:")
        for what, counts in figures.items():
            print(f"  {what:<28}" + "  ".join(f"{k} {v}" for k, v in counts.items()))


def test_empty_folders_and_objects_on_s3(tmp_path, s3_endpoint, capsys):
    """S3 has no folders: a class with no objects does not exist (the classes after it shift), while a
    folder marker (a zero-byte 'name/' key, as consoles create) is met like an empty local folder."""
    data = _bucket(s3_endpoint, "data")
    _upload_image_folder(s3_endpoint, data)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
        Bucket=data, Key="train/bat/", Body=b"")
    cfg = _config(tmp_path / "c.yaml", data, str(tmp_path / "out"), s3_endpoint)
    assert main(["index", cfg, "--out", str(tmp_path / "index")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"data.train: class folder s3://{data}/train/bat holds no images" in line
    assert not (tmp_path / "index").exists()

    # an empty object (which no ranged read can satisfy) is an image that does not decode, named as such
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.delete_object(Bucket=data, Key="train/bat/")
    s3.put_object(Bucket=data, Key="train/bee/empty.jpg", Body=b"")
    assert main(["index", cfg, "--out", str(tmp_path / "index")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"data.train: s3://{data}/train/bee/empty.jpg: cannot decode image" in line
