"""Reload without restart: the new configuration is checked whole, then swapped in at once.

What a running firewall reads per request can change: ``throttle``, ``alerts``, each model's
``policy``, and each detector's ``live_fields`` (its thresholds, radius, passes: what it reads from
its configuration on every call). Anything else (listeners, models, backends, the sanitizer,
detector lists, sizes of the state) was built into the running firewall and needs a restart: a
file that changes it is refused whole, naming those fields, and the running configuration stays.

``plan`` does every check and can fail; ``apply`` only assigns references, on the event loop in
one synchronous step, so no other handler runs between them. A request already on a worker thread
finishes with the values it started with, component by component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from firewall.alerts import AlertAggregator
from firewall.config import ConfigError, Settings
from firewall.pipeline import ModelPipeline
from firewall.policy import ResponsePolicy
from firewall.throttle import Admission

LIVE_SECTIONS = ("throttle", "alerts")
ABSENT = object()


@dataclass(frozen=True)
class Plan:
    settings: Settings
    changed: list[str]  # dotted paths of the fields that differ


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [1]}} -> {"a.b.0": 1}; empty containers stay as leaves."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def is_live(path: str, running: Settings, new: Settings) -> bool:
    parts = path.split(".")
    if parts[0] in LIVE_SECTIONS:
        return True
    if parts[0] != "models" or len(parts) < 3 or parts[1] not in running.models or parts[1] not in new.models:
        return False
    if parts[2] == "policy":
        return True
    if parts[2] != "detectors" or len(parts) < 5:
        return False
    index = int(parts[3])
    old_detectors, new_detectors = running.models[parts[1]].detectors, new.models[parts[1]].detectors
    if index >= len(old_detectors) or index >= len(new_detectors):
        return False
    old, replacement = old_detectors[index], new_detectors[index]
    return type(old) is type(replacement) and parts[4] in getattr(old, "live_fields", frozenset())


def plan(running: Settings, new: Settings) -> Plan:
    """Check that ``new`` differs from ``running`` only where a running firewall can change; raise ``ConfigError`` if not."""
    before, after = flatten(running.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path, ABSENT) != after.get(path, ABSENT))
    fixed = [path for path in changed if not is_live(path, running, new)]
    if fixed:
        raise ConfigError(f"these fields need a restart: {', '.join(fixed)}")
    return Plan(new, changed)


def apply(
    plan: Plan, policy: ResponsePolicy, admission: Admission, alerts: AlertAggregator, pipelines: dict[str, ModelPipeline]
) -> None:
    """Swap the new values in (reference assignments only: nothing here can fail half-way)."""
    new = plan.settings
    policy.settings = new
    admission.config = new.throttle
    alerts.config = new.alerts
    for name, pipeline in pipelines.items():
        detector_stages = [stage for stage in pipeline.chain if hasattr(getattr(stage, "config", None), "kind")]
        for stage, detector in zip(detector_stages, new.models[name].detectors):  # both in configured order
            live = getattr(detector, "live_fields", frozenset())
            if live and type(stage.config) is type(detector):
                stage.config = stage.config.model_copy(update={field: getattr(detector, field) for field in live})
        pipeline.arrange(new.models[name].policy)  # a rule no longer only monitored runs before the answer again
