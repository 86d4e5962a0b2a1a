"""The EC2 backend: instances from an image with the executor baked in, found by tag.

Every instance carries two tags: ``falconet:cluster`` (the fleet) and
``falconet:launch-token`` (the launch that made it).  Every describe is filtered by the
cluster tag, never account-wide.  A launch passes its token as EC2's ClientToken, and a
launch retried after an unclear failure first looks for instances with its token tag, so
it never starts twice even on EC2-compatible clouds that ignore ClientToken.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any

from falconet import failpoints
from falconet.errors import FalconetError, LaunchError
from falconet.provisioner import prices
from falconet.provisioner.backend import Machine
from falconet.provisioner.policy import InstanceType
from falconet.userdata import UserData, with_cloud_config

log = logging.getLogger("falconet.provisioner.ec2")

CLUSTER_TAG = "falconet:cluster"
TOKEN_TAG = "falconet:launch-token"
LIVE_STATES = ["pending", "running", "stopping", "stopped"]  # everything that may still cost


@dataclass(frozen=True)
class Ec2Settings:
    """Where and what to launch."""

    cluster: str
    ami: str  #: ami-..., name:PATTERN, tag:KEY=VALUE, or a bare name pattern
    instance_types: tuple[str, ...] = ("c5.large",)
    ami_owner: str = "self"
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None  #: EC2-compatible clouds (Eucalyptus, OpenStack), tests
    subnet_id: str | None = None
    security_group_ids: tuple[str, ...] = ()
    key_name: str | None = None
    iam_profile: str | None = None  #: instance profile name or ARN
    spot: bool = False
    slots: int = 0  #: executor slots per instance; 0: one per vCPU
    tags: dict = field(default_factory=dict)  #: extra tags for instances and volumes
    prices: dict = field(default_factory=dict)
    cloud_init: str = ""  #: a cloud-config for stock images; user-data becomes multipart
    executor_tags: tuple[str, ...] = ()  #: tags its executors report (user-data); site=cloud is implied


class Ec2Backend:
    """start/stop/list over boto3, every call counted for `falconet status`."""

    name = "ec2"

    def __init__(self, settings: Ec2Settings, user_data: UserData):
        import boto3
        import botocore.config

        self.settings = settings
        self.user_data = user_data
        try:
            session = boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
        except Exception as exc:  # ProfileNotFound and friends
            raise FalconetError(f"AWS session: {exc}") from None
        if session.region_name is None:
            raise FalconetError("no AWS region: pass --region, or set AWS_REGION / a profile's region")
        self.ec2 = session.client("ec2", endpoint_url=settings.endpoint_url,
                                  config=botocore.config.Config(retries={"mode": "standard"}))
        self.calls: collections.Counter[str] = collections.Counter()
        self.ec2.meta.events.register("before-call.ec2", self._count)
        self._tried: set[str] = set()
        self.image_id = ""
        self._types: tuple[InstanceType, ...] = ()

    def _count(self, model: Any = None, **_: Any) -> None:
        self.calls[model.name] += 1

    def api_calls(self) -> dict[str, int]:
        return dict(self.calls)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """One API call, its failures turned into one line saying what to do."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(**kwargs)
        except NoCredentialsError:
            raise FalconetError(
                f"{what}: no AWS credentials found; set AWS_PROFILE or --profile, or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run with an instance role") from None
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise LaunchError(f"{what}: {err.get('Code', 'error')}: {err.get('Message', exc)}") from None
        except BotoCoreError as exc:
            raise LaunchError(f"{what}: {exc}") from None

    # ------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Resolve the image and the instance types once, before the first launch."""
        self.image_id = self._resolve_ami()
        self._types = self._describe_types()
        log.info("EC2 cluster %s: image %s, types %s; executor tags %s", self.settings.cluster,
                 self.image_id,
                 ", ".join(f"{t.name} ({t.vcpus} vCPU, {t.memory_mb} MiB, {t.arch}, ${t.price_per_hour}/h)"
                           for t in self._types), ",".join(sorted(self._types[0].caps.tags)))

    def _resolve_ami(self) -> str:
        ami, owner = self.settings.ami, self.settings.ami_owner
        if ami.startswith("ami-"):
            return ami
        if ami.startswith("tag:"):
            key, _, value = ami[4:].partition("=")
            filters = [{"Name": f"tag:{key}", "Values": [value or "*"]}]
        else:
            filters = [{"Name": "name", "Values": [ami.removeprefix("name:")]}]
        images = self._call("describe_images", self.ec2.describe_images,
                            Owners=[owner], Filters=filters)["Images"]
        images = [i for i in images if i.get("State", "available") == "available"]
        if not images:
            raise FalconetError(f"no available image owned by {owner} matches --ami {ami!r}; "
                                "build one with ami/ (see ami/README.md) or pass an ami-... id")
        newest = max(images, key=lambda i: (i.get("CreationDate", ""), i["ImageId"]))
        return newest["ImageId"]

    def _describe_types(self) -> tuple[InstanceType, ...]:
        names = list(self.settings.instance_types)
        found = self._call("describe_instance_types", self.ec2.describe_instance_types,
                           InstanceTypes=names)["InstanceTypes"]
        by_name = {t["InstanceType"]: t for t in found}
        out = []
        for name in names:
            t = by_name.get(name)
            if t is None:
                raise FalconetError(f"instance type {name} is not offered here; check --instance-types")
            archs = t.get("ProcessorInfo", {}).get("SupportedArchitectures", ["x86_64"])
            arch = "x86_64" if "x86_64" in archs else archs[0]
            vcpus = t["VCpuInfo"]["DefaultVCpus"]
            out.append(InstanceType(name, vcpus, t["MemoryInfo"]["SizeInMiB"], arch,
                                    prices.price(self.settings.prices, name, vcpus), self.settings.slots,
                                    frozenset(self.settings.executor_tags), "cloud"))
        return tuple(out)

    def types(self) -> tuple[InstanceType, ...]:
        return self._types

    # ------------------------------------------------------------ the three operations

    def list(self, token: str = "") -> list[Machine]:
        filters = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [self.settings.cluster]},
                   {"Name": "instance-state-name", "Values": LIVE_STATES}]
        if token:
            filters.append({"Name": f"tag:{TOKEN_TAG}", "Values": [token]})
        machines = []
        kwargs: dict[str, Any] = {"Filters": filters}
        while True:
            page = self._call("describe_instances", self.ec2.describe_instances, **kwargs)
            for res in page["Reservations"]:
                machines += [_machine(i) for i in res["Instances"]]
            if not page.get("NextToken"):
                return machines
            kwargs["NextToken"] = page["NextToken"]

    def start(self, itype: InstanceType, count: int, token: str) -> list[Machine]:
        if token in self._tried:  # a retry: the first try may have started them after all
            found = self.list(token)
            if found:
                log.info("launch %s had started %d instances already; not starting them again",
                         token, len(found))
                return found
        self._tried.add(token)
        s = self.settings
        tags = [{"Key": CLUSTER_TAG, "Value": s.cluster}, {"Key": TOKEN_TAG, "Value": token},
                {"Key": "Name", "Value": f"falconet-{s.cluster}"},
                *({"Key": k, "Value": v} for k, v in s.tags.items())]
        ud = UserData(**{**self.user_data.__dict__, "launch_token": token, "cluster": s.cluster}).to_json()
        if s.cloud_init:
            ud = with_cloud_config(ud, s.cloud_init)
        kwargs: dict[str, Any] = {
            "ImageId": self.image_id, "InstanceType": itype.name, "MinCount": count, "MaxCount": count,  # all or none: no half launch to reason about
            "ClientToken": token, "UserData": ud,
            "InstanceInitiatedShutdownBehavior": "terminate",  # a powered-off executor costs nothing
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},  # IMDSv2 only
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
        }
        if s.subnet_id:
            kwargs["SubnetId"] = s.subnet_id
        if s.security_group_ids:
            kwargs["SecurityGroupIds"] = list(s.security_group_ids)
        if s.key_name:
            kwargs["KeyName"] = s.key_name
        if s.iam_profile:
            key = "Arn" if s.iam_profile.startswith("arn:") else "Name"
            kwargs["IamInstanceProfile"] = {key: s.iam_profile}
        if s.spot:
            kwargs["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        resp = self._call(f"run_instances ({count} {itype.name})", self.ec2.run_instances, **kwargs)
        failpoints.hit("ec2-after-run-instances")
        self._tried.discard(token)  # known outcome: no retry will reuse this token
        return [_machine(i) for i in resp["Instances"]]

    def stop(self, ids: list[str]) -> None:
        for i in range(0, len(ids), 500):
            self._call("terminate_instances", self.ec2.terminate_instances, InstanceIds=ids[i:i + 500])


def _machine(inst: dict) -> Machine:
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    state = inst["State"]["Name"]
    return Machine(inst["InstanceId"], inst["InstanceType"], "running" if state == "running" else state,
                   inst["LaunchTime"].timestamp(), tags.get(TOKEN_TAG, ""),
                   inst.get("PrivateIpAddress", ""))
