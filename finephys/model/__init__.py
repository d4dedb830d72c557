"""The FinePhys model: configs, the networks, checkpoints, the demo and weight conversion."""
