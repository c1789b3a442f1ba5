"""Hugging Face Trainer checkpoints (`checkpoint-N/`): optimizer.pt and scheduler.pt, read with
torch.load(weights_only=True); training_args.bin (a pickle) is never loaded, only copied."""
from __future__ import annotations
