"""What an executor tells the dispatcher about the machine it runs on."""

from __future__ import annotations

import ipaddress
import os
import platform
import socket

import psutil

from falconet import needs


def addresses() -> list[str]:
    """IPv4 and IPv6 addresses of the non-loopback interfaces (as DHCP or SLAAC gave them)."""
    found = []
    for _name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = a.address.split("%", 1)[0]  # drop the IPv6 zone id
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if not ip.is_loopback:
                found.append(text)
    return found


def cpus() -> int:
    """CPUs this process may use (affinity), not merely those the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return psutil.cpu_count() or 1


def facts() -> dict:
    """hostname, addresses, cpus, memory_mb and platform."""
    return {
        "hostname": socket.gethostname(),
        "addresses": addresses(),
        "cpus": cpus(),
        "memory_mb": psutil.virtual_memory().total >> 20,
        "platform": f"{platform.system()}-{platform.machine()} python-{platform.python_version()}",
        "arch": needs.machine_arch(),
    }
