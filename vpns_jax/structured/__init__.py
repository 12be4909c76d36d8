"""Structured (channel) pruning: dependency groups traced from the model (`groups`), the capped
channel threshold and straight-through channel masks (`channels`), physically slimmed models and
their export (`slim`), and the PyTorch loader of an exported slimmed model (`torch_slim`, no JAX).
"""
