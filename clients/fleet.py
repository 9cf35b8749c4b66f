"""Talking to a fleet of apex-grpc replicas over one gRPC channel.

Owns the target syntax for several replicas (gRPC's `ipv4:`/`ipv6:` address lists, or a
`dns:///` name whose every address is a replica) and the service config that selects the
load-balancing policy. round_robin comes with client-side health checking on the readiness
service, so gRPC itself keeps loading and draining replicas out of the rotation; the replica
that served a call is named in the `apex-replica` response metadata.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Sequence

READINESS_SERVICE = "apex.v1.GenerationService"
REPLICA_METADATA_KEY = "apex-replica"
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")


def replica_of(metadata) -> str:
    """The replica named in a call's metadata ("" when absent)."""
    return dict(metadata or ()).get(REPLICA_METADATA_KEY, "")


def fleet_target(targets: Sequence[str]) -> str:
    """One gRPC target for several replicas ("ipv4:10.0.0.1:50051,10.0.0.2:50051"). The
    addresses must be IP literals; for a name, use `dns:///NAME:PORT`, which resolves to every
    address behind the name (a headless Service)."""
    addresses, versions = [], set()
    for target in targets:
        host, _, port = target.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"target {target!r}: several targets must be IP:PORT; for a DNS "
                             f"name use one target dns:///NAME:PORT with round_robin") from None
        if not port.isdigit():
            raise ValueError(f"target {target!r}: the port is missing")
        versions.add(ip.version)
        addresses.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(versions) != 1:
        raise ValueError(f"targets mix IPv4 and IPv6 addresses: {list(targets)}")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def service_config(load_balancing: str) -> str:
    """The channel's service config (JSON) for a load-balancing policy."""
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING_POLICIES}, "
                         f"got {load_balancing!r}")
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if load_balancing == "round_robin":
        # Watch each replica's readiness: a loading or draining one leaves the rotation.
        config["healthCheckConfig"] = {"serviceName": READINESS_SERVICE}
    return json.dumps(config)


def channel_target_and_options(target: str | Sequence[str], load_balancing: str | None,
                               options: Sequence[tuple[str, Any]] = ()
                               ) -> tuple[str, list[tuple[str, Any]]]:
    """(target, channel options) for one replica or a fleet; several targets imply
    round_robin."""
    options = list(options)
    if not isinstance(target, str):
        targets = list(target)
        if not targets:
            raise ValueError("no target given")
        if len(targets) > 1:
            load_balancing = load_balancing or "round_robin"
            target = fleet_target(targets)
        else:
            target = targets[0]
    if load_balancing is not None:
        options.append(("grpc.service_config", service_config(load_balancing)))
    return target, options
