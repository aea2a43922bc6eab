"""Eager PyTorch ground truth: every fast op is judged against these."""
from tubevit_fast.reference.tube_embed import tube_embed_reference

__all__ = ["tube_embed_reference"]
