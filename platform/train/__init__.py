"""Training on Ray Train + DeepSpeed: the worker (worker.py) and what it is made of: the engine,
one step (step.py), the checkpoint and evaluation policies, metrics, throughput, and saving and
resuming through the job's checkpoint store (the format is platform.checkpoint)."""
