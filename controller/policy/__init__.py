"""FUNCTIONAL CORE shared by the live control loops and the simulator: pure functions from observed
state, forecasts and profiles to desired state. No I/O, no clock, no asyncio (checked by
tools/check_layering.py).
"""
