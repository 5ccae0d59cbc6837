"""spine-node's network and orchestration: SCP, scheduler, worker, exporter, CLI, HTTP."""

__version__ = "0.1.0"
