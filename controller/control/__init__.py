"""CONTROL: the control cycle (`ControlCycle`), the one pure object that orders the control steps for
the simulator and the live controller alike, and the arrival history it keeps. No I/O, no clock, no
asyncio (checked by tools/check_layering.py).
"""
