"""Blockwise lossless speculative verification: Pallas kernel and its jnp reference (the spec)."""

from pallas_kernels.verify.common import VerifyResult
from pallas_kernels.verify.kernel import BlockSizes, verify
from pallas_kernels.verify.reference import verify_reference

__all__ = ["BlockSizes", "VerifyResult", "verify", "verify_reference"]
