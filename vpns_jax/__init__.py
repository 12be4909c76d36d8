"""vpns_jax: prune pretrained vision models with visual prompts and learned masks (VPNs), in JAX."""

__version__ = "0.1.0"
