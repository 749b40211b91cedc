"""cluster/aws_iam.py and the policies it installs, against an AWS API (a moto server on 127.0.0.1 that enforces
IAM policies): it creates the two instance profiles cluster/aws-gpu.yaml names, and with the head's role Ray's
own AWS node provider launches, lists and ends a GPU worker of aws-gpu.yaml, which the workers' role (the bucket
only, as the head's profile had before) cannot. The two rights moto does not enforce (iam:PassRole on the
workers' role, ssm:GetParameters for the `resolve:ssm:` ImageId) are checked against the policy's text."""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml

from tests.support.moto_process import moto_server

REPO = Path(__file__).resolve().parents[2]
BUCKET = "prism-ray-iam-test"
ACCOUNT = "123456789012"  # moto's account
ADMIN = {"aws_access_key_id": "admin-key", "aws_secret_access_key": "admin-secret", "region_name": "us-east-1"}


@pytest.fixture
def enforcing_aws():
    """(endpoint, enforce): a moto server of its own (IAM enforcement is process-wide in moto); enforce() turns
    it on."""
    with moto_server() as url:
        yield url, _enforcer(url)


def _enforcer(url: str):
    def enforce():
        request = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        assert json.load(urllib.request.urlopen(request))["status"] == "ok"

    return enforce


def _statements(role: str) -> list[dict]:
    file = {"prism-ray-head": "head-policy.json", "prism-ray-worker": "worker-policy.json"}[role]
    return json.loads((REPO / "cluster" / "iam" / file).read_text().replace("YOUR-BUCKET", BUCKET))["Statement"]


def _allows(statements: list[dict], action: str, resource: str) -> bool:
    for s in statements:
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
        if s["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action, a) for a in actions) \
                and any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


def test_head_policy_passes_the_workers_role_and_resolves_the_image():
    cfg = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    head = _statements("prism-ray-head")
    worker_profile = cfg["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]["Name"]
    assert _allows(head, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{worker_profile}")
    for node in cfg["available_node_types"].values():
        parameter = node["node_config"]["ImageId"].removeprefix("resolve:ssm:")
        assert _allows(head, "ssm:GetParameters", f"arn:aws:ssm:{cfg['provider']['region']}::parameter{parameter}")
    for role in ("prism-ray-head", "prism-ray-worker"):  # both read and write the run's bucket, and only it
        statements = _statements(role)
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert _allows(statements, action, f"arn:aws:s3:::{BUCKET}/runs/x")
            assert not _allows(statements, action, "arn:aws:s3:::another-bucket/x")
        assert _allows(statements, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}")
    assert not _allows(_statements("prism-ray-worker"), "ec2:RunInstances", "*")


def _run_script(url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": ADMIN["aws_access_key_id"],
           "AWS_SECRET_ACCESS_KEY": ADMIN["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1"}
    return subprocess.run([sys.executable, str(REPO / "cluster" / "aws_iam.py"), "--bucket", BUCKET], env=env,
                          capture_output=True, text=True, timeout=120)


def test_head_role_lets_rays_aws_provider_launch_and_end_workers(enforcing_aws, monkeypatch):
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    url, enforce = enforcing_aws
    first = _run_script(url)
    assert first.returncode == 0, first.stderr
    assert "role prism-ray-head created" in first.stdout and "instance profile prism-ray-worker created" in first.stdout
    again = _run_script(url)  # a second run updates the policies and creates nothing
    assert again.returncode == 0 and "created" not in again.stdout, again.stdout + again.stderr
    iam = boto3.client("iam", endpoint_url=url, **ADMIN)
    cfg = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    for node in cfg["available_node_types"].values():  # the profiles the config names exist, with their roles
        name = node["node_config"]["IamInstanceProfile"]["Name"]
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [name]
        assert iam.get_role_policy(RoleName=name, PolicyName=name)["PolicyDocument"]["Statement"] == _statements(name)
    assert _run_script(url).returncode == 0

    # someone who may assume the roles; then every request is checked against the caller's policies
    iam.create_user(UserName="tester")
    iam.put_user_policy(UserName="tester", PolicyName="assume", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    for role in ("prism-ray-head", "prism-ray-worker"):  # on AWS the instances assume them; here, the tester
        iam.update_assume_role_policy(RoleName=role, PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/tester"}, "Action": "sts:AssumeRole"}]}))
    ec2 = boto3.client("ec2", endpoint_url=url, **ADMIN)
    image = ec2.describe_images()["Images"][0]["ImageId"]  # moto cannot resolve SSM parameters: one of its AMIs
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    enforce()
    sts = boto3.client("sts", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                       aws_secret_access_key=key["SecretAccessKey"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)  # for the node provider's boto3 clients

    def provider(role: str) -> AWSNodeProvider:
        arn = f"arn:aws:iam::{ACCOUNT}:role/{role}"
        creds = sts.assume_role(RoleArn=arn, RoleSessionName=f"{role}-test")["Credentials"]
        return AWSNodeProvider({"region": "us-east-1", "cache_stopped_nodes": False, "aws_credentials": {
            "aws_access_key_id": creds["AccessKeyId"], "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"]}}, "prism-ray")

    worker_node = copy.deepcopy(cfg["available_node_types"]["gpu_worker"]["node_config"])
    worker_node.update(ImageId=image, SubnetIds=[subnet])  # what `ray up` resolves before the head gets the config
    tags = {"ray-node-kind": "worker", "ray-user-node-type": "gpu_worker", "ray-node-status": "uninitialized",
            "ray-launch-config": "test"}
    with pytest.raises(Exception, match="not authorized to perform: ec2:RunInstances"):
        provider("prism-ray-worker").create_node(copy.deepcopy(worker_node), dict(tags), 1)
    head = provider("prism-ray-head")
    head.create_node(copy.deepcopy(worker_node), dict(tags), 1)
    (node,) = head.non_terminated_nodes({"ray-user-node-type": "gpu_worker"})
    head.set_node_tags(node, {"ray-node-status": "up-to-date"})
    assert head.node_tags(node)["ray-node-status"] == "up-to-date"
    head.terminate_node(node)
    assert head.non_terminated_nodes({"ray-user-node-type": "gpu_worker"}) == []
