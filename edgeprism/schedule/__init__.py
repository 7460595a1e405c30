"""What to compute: per-layer plans (hit / wait / fetch / CPU / drop), the machine's cost model, the CPU
expert path, and the QoS layer choosing each token's quality floor and latency budget. Not yet called by
the decode loop (docs/architecture.md, "Scheduler")."""

from edgeprism.schedule.cost import CostModel, calibrate, for_store, load_or_calibrate
from edgeprism.schedule.cpu_experts import CpuExperts, default_threads
from edgeprism.schedule.qos import OperatingPoint, OperatingPoints, QosController
from edgeprism.schedule.scheduler import (
    Action,
    Plan,
    Residency,
    RoutedUnit,
    plan,
    routed_units,
)

__all__ = ["Action", "CostModel", "CpuExperts", "OperatingPoint", "OperatingPoints", "Plan", "QosController",
           "Residency", "RoutedUnit", "calibrate", "default_threads", "for_store", "load_or_calibrate", "plan",
           "routed_units"]
