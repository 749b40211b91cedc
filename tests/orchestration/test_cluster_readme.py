"""Every command of cluster/README.md that a test can reach: `ray` commands and their flags exist in the pinned
Ray's CLI, `prism-ray` and `cluster/aws_iam.py` command lines parse, the files they name exist, the submit lines
pass through a shell with another HOME and run a config the nodes have, and the names (profiles, region, node
size, KubeRay release) agree with the files. (cluster/aws_iam.py itself runs in test_aws_iam.py.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.orchestration.test_cluster_files import IMAGE_ROOT, LAUNCHER_ROOT, _check_entrypoint, _through_a_shell

REPO = Path(__file__).resolve().parents[2]
README = REPO / "cluster" / "README.md"


def _commands() -> list[str]:
    """The README's shell commands: one per line of its bash blocks, continuation lines joined, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).rstrip(" &").strip()
            if line:
                commands.append(line)
    return commands


def _words(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value assignments
        words.pop(0)
    return words


def test_the_readme_has_every_step():
    text = README.read_text()
    for step in ("IAM", "bucket", "token", "Submit", "Watch", "Stop it, and resume", "Tear it down", "image"):
        assert step in text, step
    assert len(_commands()) >= 20


def test_ray_commands_exist_with_their_flags():
    from ray.scripts.scripts import cli

    seen = set()
    for command in _commands():
        words = _words(command)
        if not words or words[0] != "ray":
            continue
        group, rest = cli, words[1:]
        while hasattr(group, "commands") and rest and rest[0] in group.commands:
            group, rest = group.commands[rest[0]], rest[1:]
        assert group is not cli and not hasattr(group, "commands"), f"no such ray command: {command}"
        known = {o for p in group.params for o in p.opts}
        flags = [w.split("=")[0] for w in rest[:rest.index("--") if "--" in rest else len(rest)] if w.startswith("-")]
        assert set(flags) <= known, f"{command}: {set(flags) - known} not in `{group.name}`'s options"
        seen.add(group.name)
    assert {"up", "dashboard", "submit", "logs", "stop", "down", "get-auth-token", "exec"} <= seen


def test_prism_ray_and_aws_iam_command_lines_parse():
    from cluster_aws_iam import build_parser

    from prism_ray.cli import build_parser as prism_parser

    checked = 0
    for command in _commands():
        words = _words(command)
        if "--" in words and words[0] == "ray":
            words = words[words.index("--") + 1:]  # what a job runs
        if words[:1] == ["prism-ray"]:
            prism_parser().parse_args([w.replace("BUCKET", "bucket") for w in words[1:]])
            checked += 1
        elif words[:2] == ["python", "cluster/aws_iam.py"]:
            build_parser().parse_args(words[2:])
            checked += 1
    assert checked >= 5


@pytest.fixture(autouse=True)
def _aws_iam_importable(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("cluster_aws_iam", REPO / "cluster" / "aws_iam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "cluster_aws_iam", module)


def test_files_the_commands_name_exist():
    named = set()
    for command in _commands():
        for word in _words(command):
            if word.startswith("cluster/") or word.startswith("jobs/"):
                named.add(word)
    assert {"cluster/aws-gpu.yaml", "cluster/kuberay-rayjob.yaml", "cluster/kuberay-raycluster.yaml",
            "cluster/Dockerfile", "cluster/aws_iam.py"} <= named
    for path in named:
        assert (REPO / path).is_file(), path


def test_submit_lines_run_a_config_the_nodes_have(capsys):
    submits = [c for c in _commands() if " job submit " in f" {c} " and "prism_ray run" in c]
    assert len(submits) == 2
    for command in submits:
        root = LAUNCHER_ROOT if LAUNCHER_ROOT in command else IMAGE_ROOT
        argv = _through_a_shell(command.replace("BUCKET", "bucket"))
        _check_entrypoint(shlex.join(argv), capsys, root=root)


def test_names_agree_with_the_files():
    text = README.read_text()
    aws = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    for node in aws["available_node_types"].values():
        assert f"`{node['node_config']['IamInstanceProfile']['Name']}`" in text
    assert f"--region {aws['provider']['region']}" in text
    assert aws["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] in text
    assert "KubeRay **1.5.1 or newer**" in text and "--version 1.5.1" in text
