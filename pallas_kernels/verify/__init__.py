"""Blockwise lossless speculative verification: Pallas kernels (a TPU and a GPU formulation)
and their jnp reference (the spec)."""

from pallas_kernels.verify.common import VerifyResult
from pallas_kernels.verify.kernel import FORMULATIONS, BlockSizes, verify
from pallas_kernels.verify.reference import verify_reference

__all__ = ["FORMULATIONS", "BlockSizes", "VerifyResult", "verify", "verify_reference"]
