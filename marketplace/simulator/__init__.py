"""Trace-replay simulator of the marketplace: owners' GPUs come and go as their duty-cycle
traces say, renters' jobs arrive as a job trace says, and the same placement policies the
matcher runs (marketplace.placement) place them. See docs/simulator.md."""
