"""The files under cluster/: each checked against its schema (the KubeRay manifests against the fields of the
v1.5.1 CRDs, aws-gpu.yaml against the launcher schema of the pinned Ray, as `ray up` checks it), every entrypoint
names a module and a config that exist and that `prism-ray validate` accepts with the manifest's overrides, the
submit lines as a shell with another HOME passes them on, the image's build context, and the pods' sizes."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from prism_ray.cli import main

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/prism-ray/"  # where cluster/Dockerfile puts this checkout
LAUNCHER_ROOT = "/home/ubuntu/prism-ray/"  # where cluster/aws-gpu.yaml's file_mounts put it (ssh_user ubuntu)
KUBERAY_FIELDS = REPO / "tests" / "data" / "kuberay-v1.5.1-fields.yaml"
# The full CRDs of KubeRay releases, when a copy is at hand (not part of the project): <release>/ray.io_<kind>s.yaml
KUBERAY_CRDS = [Path(p) for p in (os.environ.get("PRISM_KUBERAY_CRDS", ""), REPO.parent / "shared" / "kuberay",
                                   "/work/shared/kuberay") if p]


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
    _kuberay_schema_check(job)
    spec = job["spec"]
    sets = _check_entrypoint(spec["entrypoint"], capsys)
    assert "ray.workers=auto" in sets
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    _check_cluster_spec(spec["rayClusterSpec"])


def test_raycluster_and_its_submit_line(capsys):
    (cluster,) = _docs(CLUSTER / "kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _kuberay_schema_check(cluster)
    _check_cluster_spec(cluster["spec"])
    # the header's `ray job submit` line runs a config the image has
    text = (CLUSTER / "kuberay-raycluster.yaml").read_text()
    submit = re.search(r"^#\s*(ray job submit --address .*?)\n#\s*ray job stop", text, re.S | re.M).group(1)
    _check_entrypoint(shlex.join(_through_a_shell(submit)), capsys)
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


def _through_a_shell(line: str) -> list[str]:
    """The arguments `ray job submit` gets after `-- `, when `line` (a header's submit line, with its line breaks
    and comment marks) runs in bash with another HOME than the nodes' (`ray` there prints its argv)."""
    line = re.sub(r"\\\n#\s*", " ", line)
    fake_home = "/tmp/prism-ray-not-the-nodes-home"
    script = 'ray() { printf "%s\\0" "$@"; }\n' + line
    out = subprocess.run(["bash", "-c", script], env={"HOME": fake_home, "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    argv = out.split("\0")[:-1]
    assert not any(fake_home in a for a in argv), f"the submitting shell expanded its own HOME into {argv}"
    return argv[argv.index("--") + 1:]


def _kuberay_schema_check(doc: dict) -> None:
    """`doc` against the fields of the KubeRay v1.5.1 CRDs our manifests use (tests/data), and the manifest's
    header names a KubeRay release at least as new as every field it uses."""
    fields = yaml.safe_load(KUBERAY_FIELDS.read_text())
    schema = {"$defs": fields["$defs"], **fields[doc["kind"]]}
    jsonschema.validate(doc, schema)
    since = [v["x-since"] for v in _walk(fields) if "x-since" in v]
    header = (CLUSTER / f"kuberay-{doc['kind'].lower()}.yaml").read_text()
    needs = re.search(r"KubeRay operator >= (\d+)\.(\d+)\.(\d+)", header)
    assert needs, "the header must say which KubeRay release the manifest needs"
    assert tuple(map(int, needs.groups())) >= max(tuple(map(int, v[1:].split("."))) for v in since)


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_the_fields_file_rejects_what_kuberay_rejects():
    (cluster,) = _docs(CLUSTER / "kuberay-raycluster.yaml")
    fields = yaml.safe_load(KUBERAY_FIELDS.read_text())
    schema = {"$defs": fields["$defs"], **fields["RayCluster"]}
    for path, value in [(("spec", "authOptions", "mode"), "Token"),  # enums are case sensitive
                        (("spec", "autoscalerOptions", "idleTimeoutSecond"), 60),  # misspelt
                        (("spec", "workerGroupSpecs", 0, "maxReplicas"), "16")]:  # int32, not a string
        bad = json.loads(json.dumps(cluster))
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def _crd_schema(crd: dict) -> dict:
    """The v1 openAPIV3Schema of a CRD as strict JSON Schema: the API server prunes (or, with strict field
    validation, rejects) unknown fields, and int-or-string fields take both."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]

    def strict(node):
        if isinstance(node, list):
            return [strict(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: strict(v) for k, v in node.items() if k != "description"}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node

    return strict(version["schema"]["openAPIV3Schema"])


def _crd_releases() -> dict[str, Path]:
    found = {}
    for root in KUBERAY_CRDS:
        for release in ("v1.5.0", "v1.5.1"):
            if (root / release / "ray.io_rayclusters.yaml").is_file():
                found.setdefault(release, root / release)
    return found


@pytest.mark.skipif("v1.5.1" not in _crd_releases(), reason="no copy of KubeRay v1.5.1's CRDs at hand")
def test_manifests_against_the_full_kuberay_crds():
    """The extra check where the full CRDs are at hand: v1.5.1 accepts both manifests, v1.5.0 refuses authOptions."""
    releases = _crd_releases()
    for name in ("kuberay-rayjob.yaml", "kuberay-raycluster.yaml"):
        (doc,) = _docs(CLUSTER / name)
        crd = yaml.safe_load((releases["v1.5.1"] / f"ray.io_{doc['kind'].lower()}s.yaml").read_text())
        jsonschema.validate(doc, _crd_schema(crd))
        if "v1.5.0" in releases:
            old = yaml.safe_load((releases["v1.5.0"] / f"ray.io_{doc['kind'].lower()}s.yaml").read_text())
            with pytest.raises(jsonschema.ValidationError, match="authOptions"):
                jsonschema.validate(doc, _crd_schema(old))


def test_dockerfile_puts_the_project_where_the_manifests_look():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text and "COPY --chown=ray:users jobs ./jobs" in text
    ray_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                   if d.startswith("ray"))
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M).group(1)
    assert base.startswith(ray_pin.split("==")[1] + "-py")
    # the torch wheel brings the CUDA libraries: a -gpu/-cu base would pull a second copy on every node
    assert not re.search(r"-(gpu|cu\d+)$", base), base
    # ...and the NVIDIA runtime mounts the driver's compute libraries only when asked
    assert re.search(r"^ENV NVIDIA_DRIVER_CAPABILITIES=\S*compute", text, re.M)


def test_docker_build_context_is_what_the_dockerfile_copies():
    from docker.utils.build import exclude_paths  # Docker's own .dockerignore rules

    sent = exclude_paths(str(REPO), (REPO / ".dockerignore").read_text().splitlines(), dockerfile="cluster/Dockerfile")
    copied = re.findall(r"^COPY --chown=\S+ (.+) \S+$", (CLUSTER / "Dockerfile").read_text(), re.M)
    sources = {src for line in copied for src in line.split()}
    assert sources == {"pyproject.toml", "README.md", "prism_ray", "jobs"}
    tops = {p.split("/")[0] for p in sent}
    assert tops == sources | {"cluster", ".dockerignore"}, tops  # the Dockerfile itself goes along
    assert "cluster/Dockerfile" in sent and not any(p.startswith("cluster/") and p != "cluster/Dockerfile"
                                                    for p in sent)
    # everything `pip install .` packages is there (the presets are package data)
    presets = {str(p.relative_to(REPO)) for p in (REPO / "prism_ray" / "presets").rglob("*.yaml")}
    assert presets and presets <= sent
    assert not any("__pycache__" in p for p in sent)


def _aws() -> dict:
    (cfg,) = _docs(CLUSTER / "aws-gpu.yaml")
    return cfg


def test_aws_launcher_config_passes_the_launchers_schema():
    """What `ray up` does before it touches AWS: merge Ray's AWS defaults and validate against ray-schema.json of
    the pinned Ray; and the file itself, before any merge, against the same schema."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_aws(), schema)
    merged = prepare_config(_aws())
    validate_config(merged)
    bad = {**_aws(), "head_setup_command": []}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_aws_commands_are_whole_shell_commands():
    """Every command the launcher runs on the nodes parses in bash (a plain YAML scalar with " #" in it would be
    cut short there), and the packages are listed before apt installs one."""
    from ray.autoscaler._private.util import prepare_config

    merged = prepare_config(_aws())
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in merged.get(key, [])]
    for command in commands:
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"
    installs = [c for c in _aws()["setup_commands"] if "apt-get" in c and " install " in c]
    assert installs and all(re.search(r"apt-get\b[^;&|]*\bupdate\b.*&&.*apt-get\b[^;&|]* install ", c) for c in installs)
    assert any("prism-ray-env" in c and c.rstrip().endswith("~/.bashrc") for c in _aws()["setup_commands"])


def test_aws_head_keeps_what_rays_defaults_gave_it():
    """boto3 for the autoscaler on the head (Ray's default head_setup_commands are replaced by any of ours), the
    open-files limit of Ray's default start commands, and a metrics port on every node."""
    cfg = _aws()
    assert any("boto3" in c and "~/venv/bin/pip install" in c for c in cfg["head_setup_commands"])
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert command.startswith("ulimit -n 65536; RAY_AUTH_MODE=token ray start") and \
            "--metrics-export-port=8080" in command


def test_aws_launcher_config(capsys):
    cfg = _aws()
    for name, node in cfg["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:")), name
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] == 0
    # the profiles cluster/aws_iam.py creates: the head's can launch workers, the workers' reads the bucket
    profiles = {name: node["node_config"]["IamInstanceProfile"]["Name"]
                for name, node in cfg["available_node_types"].items()}
    assert profiles == {"head": "prism-ray-head", "gpu_worker": "prism-ray-worker"}
    # the checkout goes to the nodes without the virtualenv and the run outputs
    assert {"**/.venv", "**/runs", "**/.git"} <= set(cfg["rsync_exclude"]) and ".gitignore" in cfg["rsync_filter"]
    assert cfg["file_mounts"]["~/prism-ray"] == "." and cfg["auth"]["ssh_user"] == "ubuntu"  # LAUNCHER_ROOT
    # token auth on head and workers, the same token everywhere, the dashboard on the head's loopback only
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in (CLUSTER / "aws-gpu.yaml").read_text()
    assert any("pip install" in c and "~/prism-ray" in c for c in cfg["setup_commands"])
    # the header's submit line, through `ray dashboard` and a shell whose HOME is not the nodes', runs a config
    # the nodes have
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "ray dashboard cluster/aws-gpu.yaml" in text
    submit = re.search(r"^#\s*(RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 .*?)\n#\s*ray down",
                       text, re.S | re.M).group(1)
    _check_entrypoint(shlex.join(_through_a_shell(submit)), capsys, root=LAUNCHER_ROOT)


# A node of the kind the KubeRay manifests are sized for (their comment says so): g5.2xlarge, 8 vCPUs, 32 GiB.
# What the kubelet leaves for pods on EKS: MemTotal (~95% of the nominal size) less kube-reserved (255 MiB + 11 MiB
# per pod, 58 pods on a g5.2xlarge) and the 100 MiB eviction threshold; CPU less 6% of the first core, 1% of the
# second, 0.5% of the next two and 0.25% of the rest; and 1 GiB and 0.3 CPU kept for DaemonSets (CNI, kube-proxy,
# the NVIDIA device plugin).
NODE_VCPUS, NODE_GIB, NODE_PODS = 8, 32, 58
ALLOCATABLE_GIB = 0.95 * NODE_GIB - (255 + 11 * NODE_PODS + 100) / 1024 - 1.0
ALLOCATABLE_CPU = NODE_VCPUS - (0.06 + 0.01 + 2 * 0.005 + (NODE_VCPUS - 4) * 0.0025) - 0.3


def _quantity_gib(q: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Gi|Mi)", q).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


@pytest.mark.parametrize("name", ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"])
def test_gpu_pods_fit_the_node_they_are_sized_for_and_hold_a_worker(name):
    from prism_ray.config_loader import load_config
    from prism_ray.memory import worker_memory

    (doc,) = _docs(CLUSTER / name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests == limits  # what Ray sees (limits) is what the scheduler reserved
    assert "g5.2xlarge" in (CLUSTER / name).read_text()
    assert _quantity_gib(requests["memory"]) <= ALLOCATABLE_GIB and float(requests["cpu"]) <= ALLOCATABLE_CPU
    # ...and one worker of the entrypoint's config fits in what Ray gives tasks there (70%: 30% object store)
    cfg = load_config(str(REPO / "jobs/configs/imagenet/resnet18.yaml"), ["recover.ipc=50"])
    assert float(limits["cpu"]) >= cfg.ray.cpus_per_worker and float(limits["nvidia.com/gpu"]) >= cfg.ray.gpus_per_worker
    need = max(w.host for w in worker_memory(cfg, 1000))
    assert 0.7 * _quantity_gib(limits["memory"]) * 2**30 >= need


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
