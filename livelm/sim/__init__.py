"""The cluster simulator: livelm's real scheduler, KV manager and policies driven by a
calibrated step cost model instead of the model (docs/scheduling.md#the-simulator)."""
