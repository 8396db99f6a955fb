"""Hugging Face checkpoints in and out (see docs/huggingface.md)."""
