"""Pure data of the control plane: request classes, SLOs, profiles. No I/O, no clock, no asyncio."""
