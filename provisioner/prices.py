"""On-demand prices (USD per hour, Linux, us-east-1) for spend estimates and type choice.

These are estimates of public list prices, good enough to cap a budget and to pick the
cheaper of two types; give your own with ``--prices FILE`` (a TOML or JSON table of
``"type" = price``) for other regions, spot, or negotiated rates.  A type missing from
both tables is priced by its vCPUs at DEFAULT_PER_VCPU and logged once.
"""

from __future__ import annotations

import json
from pathlib import Path

from falconet.errors import FalconetError

DEFAULT_PER_VCPU = 0.05

ON_DEMAND: dict[str, float] = {
    "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "t3.large": 0.0832,
    "t3.xlarge": 0.1664, "t3.2xlarge": 0.3328,
    "t4g.micro": 0.0084, "t4g.small": 0.0168, "t4g.medium": 0.0336, "t4g.large": 0.0672,
    "c5.large": 0.085, "c5.xlarge": 0.17, "c5.2xlarge": 0.34, "c5.4xlarge": 0.68,
    "c5.9xlarge": 1.53, "c5.18xlarge": 3.06,
    "c6i.large": 0.085, "c6i.xlarge": 0.17, "c6i.2xlarge": 0.34, "c6i.4xlarge": 0.68,
    "c6g.large": 0.068, "c6g.xlarge": 0.136, "c6g.2xlarge": 0.272, "c6g.4xlarge": 0.544,
    "c7g.large": 0.0725, "c7g.xlarge": 0.145, "c7g.2xlarge": 0.29,
    "m5.large": 0.096, "m5.xlarge": 0.192, "m5.2xlarge": 0.384, "m5.4xlarge": 0.768,
    "m6i.large": 0.096, "m6i.xlarge": 0.192, "m6i.2xlarge": 0.384,
    "m6g.large": 0.077, "m6g.xlarge": 0.154, "m6g.2xlarge": 0.308,
    "r5.large": 0.126, "r5.xlarge": 0.252, "r5.2xlarge": 0.504,
}


def load(path: str | None) -> dict[str, float]:
    """The built-in table, overridden by the user's file when given."""
    table = dict(ON_DEMAND)
    if not path:
        return table
    text = Path(path).read_text()
    try:
        if path.endswith(".json"):
            extra = json.loads(text)
        else:
            from falconet.config import toml_loads

            extra = toml_loads(text)
    except ValueError as exc:
        raise FalconetError(f"prices file {path}: {exc}") from None
    for name, price in extra.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
            raise FalconetError(f"prices file {path}: price of {name!r} must be a number of USD per hour")
        table[name] = float(price)
    return table


def price(table: dict[str, float], name: str, vcpus: int) -> float:
    """The hourly price of a type, estimated by vCPUs when the table lacks it."""
    if name in table:
        return table[name]
    return ON_DEMAND.get(name, DEFAULT_PER_VCPU * vcpus)
