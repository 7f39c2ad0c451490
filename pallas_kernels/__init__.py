"""Pallas kernels of draft-opd (each with a plain-jnp reference beside it)."""
