"""The trace-driven cluster simulator behind `dctl simulate` and `dctl profile`: trace readers, the
virtual-clock cluster of simulated nodes (built from `agent.sim`), baselines, reports, and the checks
of the physics model against public measurements. It calls the same policy code as the live controller.
"""
