"""GRPODx: distributed GRPO training of a diagnosing doctor model."""

__version__ = "0.1.0"
