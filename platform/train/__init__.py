"""Training on Ray Train + DeepSpeed: engine, loop, world-size-independent state."""
