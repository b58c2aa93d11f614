"""Shared attention-backend test cases: they live in loom.testing, where the conformance kit
uses the same copy."""
from loom.testing.attention_cases import (DECODE_BATCH, MIXED_BATCHES, TOLERANCE,  # noqa: F401
                                          build_metadata, check_against_ref, random_inputs,
                                          rel_err, run_with_ref)
