"""The files under cluster/: every manifest parses, every entrypoint names a module and a config that exist and
that `prism-ray validate` accepts with the manifest's overrides, and each says what a cluster needs."""
from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from prism_ray.cli import main

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/prism-ray/"  # where cluster/Dockerfile puts this checkout
LAUNCHER_ROOT = "~/prism-ray/"  # where cluster/aws-gpu.yaml's file_mounts put it


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_entrypoint(command: str, capsys, root: str = IMAGE_ROOT) -> list[str]:
    """`python -m prism_ray run CONFIG --set ...`: the module and config exist, and validate accepts them."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "prism_ray"], command
    assert (REPO / "prism_ray" / "__main__.py").is_file()
    subcommand, config, *rest = argv[3:]
    assert subcommand == "run"
    assert config.startswith(root), f"{config} is not inside the project folder the nodes have ({root})"
    local = REPO / config[len(root):]
    assert local.is_file(), f"{config}: no {local.relative_to(REPO)} in the project"
    sets = rest[1::2]
    assert rest[0::2] == ["--set"] * len(sets), rest
    assert main(["validate", str(local), *[a for s in sets for a in ("--set", s)]]) == 0, capsys.readouterr().err
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["run"]["output"].startswith("s3://"), "a retried job resumes only from shared storage"
    return sets


def test_rayjob(capsys):
    (job,) = _docs(CLUSTER / "kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    sets = _check_entrypoint(spec["entrypoint"], capsys)
    assert "ray.workers=auto" in sets
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    _check_cluster_spec(spec["rayClusterSpec"])


def test_raycluster_and_its_submit_line(capsys):
    (cluster,) = _docs(CLUSTER / "kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(cluster["spec"])
    # the header's `ray job submit` line runs a config the image has
    text = (CLUSTER / "kuberay-raycluster.yaml").read_text()
    submit = re.search(r"ray job submit --address \S+ -- (python -m prism_ray run .*?)\n#\s*ray job stop",
                       text, re.S).group(1)
    _check_entrypoint(re.sub(r"\\\n#\s*", " ", submit), capsys)
    secret = re.search(r"kubectl get secret (\S+) ", text).group(1)
    assert secret == cluster["metadata"]["name"]  # KubeRay names the token's Secret after the cluster


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0 and gpu["maxReplicas"] >= 1
    for container in (head_container, *gpu["template"]["spec"]["containers"]):
        assert {"secretRef": {"name": "prism-ray-s3"}} in container["envFrom"]  # S3 credentials from a Secret
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_dockerfile_puts_the_project_where_the_manifests_look():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text and "COPY --chown=ray:users jobs ./jobs" in text
    ray_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                   if d.startswith("ray"))
    assert ray_pin.split("==")[1] in re.search(r"^FROM rayproject/ray:(\S+)", text, re.M).group(1)


def test_aws_launcher_config(capsys):
    (cfg,) = _docs(CLUSTER / "aws-gpu.yaml")
    for name, node in cfg["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:")), name
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] == 0
    # the checkout goes to the nodes without the virtualenv and the run outputs
    assert {"**/.venv", "**/runs", "**/.git"} <= set(cfg["rsync_exclude"]) and ".gitignore" in cfg["rsync_filter"]
    # token auth on head and workers, the same token everywhere, the dashboard on the head's loopback only
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in (CLUSTER / "aws-gpu.yaml").read_text()
    assert any("pip install" in c and "~/prism-ray" in c for c in cfg["setup_commands"])
    # the header's submit line, through `ray dashboard`, runs a config the nodes have
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "ray dashboard cluster/aws-gpu.yaml" in text
    submit = re.search(r"ray job submit --address http://127.0.0.1:8265 -- (python -m prism_ray run .*?)\n#\s*ray down",
                       text, re.S).group(1)
    _check_entrypoint(re.sub(r"\\\n#\s*", " ", submit), capsys, root=LAUNCHER_ROOT)


def test_runtime_env_repeats_the_project_dependencies():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert env["pip"] == deps and env["working_dir"] == "."


def test_local_cluster_script_is_valid_bash():
    script = CLUSTER / "local.sh"
    assert script.stat().st_mode & 0o111, "cluster/local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run([str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: cluster/local.sh up|status|down" in usage.stderr


@pytest.mark.parametrize("path", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_manifest_parses(path):
    assert _docs(CLUSTER / path)
