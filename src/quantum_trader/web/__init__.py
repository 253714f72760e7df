"""The live dashboard (`qt web`, port 8040): plans with their two permits and outcome, positions, ratios,
latency, service health and the kill switch."""
