"""Create the two IAM roles and instance profiles that cluster/aws-gpu.yaml names (run it once per account):

  prism-ray-head    the head: Ray's autoscaler launches, tags, lists and terminates the GPU workers
                    (ec2:RunInstances, CreateTags, Describe*, TerminateInstances), hands them their profile
                    (iam:PassRole on prism-ray-worker), resolves the config's `resolve:ssm:` ImageId
                    (ssm:GetParameters), and the driver reads and writes the run's bucket
  prism-ray-worker  the GPU workers: the run's bucket only

    python cluster/aws_iam.py --bucket YOUR-BUCKET

The policies are cluster/iam/head-policy.json and worker-policy.json with YOUR-BUCKET replaced. Running it
again updates the policies and leaves the rest as it is. It needs boto3 (which `ray up` on AWS needs too) and
credentials allowed to create roles (iam:CreateRole, PutRolePolicy, CreateInstanceProfile,
AddRoleToInstanceProfile); whoever runs `ray up` also needs iam:PassRole on prism-ray-head.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROLES = {"prism-ray-head": "head-policy.json", "prism-ray-worker": "worker-policy.json"}
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule for bucket names


def policy(file: str, bucket: str) -> str:
    return (HERE / "iam" / file).read_text().replace("YOUR-BUCKET", bucket)


def ensure(iam, role: str, policy_file: str, bucket: str) -> list[str]:
    """Create `role` (trusted by EC2) and its instance profile of the same name, if missing; (re)write its
    inline policy. Returns what was done, for people."""
    done = []
    try:
        iam.get_role(RoleName=role)
    except iam.exceptions.NoSuchEntityException:
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=(HERE / "iam" / "ec2-trust.json").read_text(),
                        Description="prism-ray (cluster/aws-gpu.yaml)")
        done.append(f"role {role} created")
    iam.put_role_policy(RoleName=role, PolicyName=role, PolicyDocument=policy(policy_file, bucket))
    done.append(f"role {role}: policy {policy_file} for bucket {bucket}")
    try:
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        done.append(f"instance profile {role} created")
    if role not in [r["RoleName"] for r in profile.get("Roles", [])]:
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
        done.append(f"instance profile {role}: role {role} added")
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", required=True, help="the bucket of run.output (s3://BUCKET/...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not BUCKET_NAME.match(args.bucket):
        parser.error(f"--bucket: {args.bucket!r} is not a bucket name (give the name only, without s3://)")
    import boto3

    iam = boto3.client("iam")
    for role, file in ROLES.items():
        for line in ensure(iam, role, file, args.bucket):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
