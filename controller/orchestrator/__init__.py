"""ORCHESTRATOR: turns a desired cluster state into costed, ordered reconfiguration actions.

Flow: the policy core (`controller.policy`) returns the whole desired `ClusterPlan`; `plan.py` compares
it with the observed instances and returns the actions (start / stop / TP change / clock change) with
their costs and earliest start times. The simulator (`controller.sim.cluster`) executes them on
simulated instances; later the live controller executes them through the node agents. `plan.py` is a
pure function (no clock, no I/O): time is an argument.
"""

from controller.orchestrator.plan import (
    ACTION_KINDS,
    Action,
    ActionKind,
    Hysteresis,
    InstanceModel,
    ReconfigCosts,
    plan_reconfiguration,
)

__all__ = [
    "ACTION_KINDS",
    "Action",
    "ActionKind",
    "Hysteresis",
    "InstanceModel",
    "ReconfigCosts",
    "plan_reconfiguration",
]
