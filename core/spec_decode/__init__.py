"""Speculative decoding: proposers (n-gram, draft model, benchmark oracle), the verification of
their drafts, its configuration and statistics. ``build_proposer`` makes the configured one."""
from __future__ import annotations

from typing import TYPE_CHECKING

from loom.spec_decode.config import SpeculativeConfig
from loom.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from loom.engine_core import EngineCore
    from loom.plugin_manager import PluginManager


def build_proposer(spec: SpeculativeConfig, engine: "EngineCore", pm: "PluginManager",
                   attn_cls) -> Proposer:
    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        from loom.spec_decode.ngram import NgramProposer
        return NgramProposer(k, spec.prompt_lookup_min, spec.prompt_lookup_max)
    if spec.method == "oracle":
        from loom.spec_decode.oracle import OracleProposer
        return OracleProposer(k, spec.acceptance_rate, spec.seed, engine.model_config.vocab_size,
                              spec.force_path)
    from loom.spec_decode.draft import DraftModelProposer, load_draft_runner
    return DraftModelProposer(k, load_draft_runner(spec, engine, pm, attn_cls))
