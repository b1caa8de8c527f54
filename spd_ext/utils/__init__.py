"""Small helpers shared by every layer (no torch.distributed, no ops)."""
