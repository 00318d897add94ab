"""Executors: how a node runs its tasks (base.py: the interfaces; runner.py: the task state
machine; container.py and native.py: the two executors)."""
