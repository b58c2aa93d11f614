"""Running totals of speculative decoding: drafts proposed and verified, tokens accepted."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0            # verifications: (request, step) pairs with drafts
    num_draft_tokens: int = 0      # draft tokens verified
    num_accepted_tokens: int = 0   # of which accepted
    accepted_per_position: list[int] = field(default_factory=list)  # accepted as j-th draft

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        missing = num_draft_tokens - len(self.accepted_per_position)
        if missing > 0:
            self.accepted_per_position += [0] * missing
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens over verified ones."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verification emits on average: accepted drafts plus the one after them."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "accepted_per_position": list(self.accepted_per_position),
                "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length}

    def since(self, before: "SpecDecodeStats") -> "SpecDecodeStats":
        """What happened after ``before`` (an earlier copy of these totals)."""
        per_position = [n - (before.accepted_per_position[j]
                             if j < len(before.accepted_per_position) else 0)
                        for j, n in enumerate(self.accepted_per_position)]
        return SpecDecodeStats(self.num_drafts - before.num_drafts,
                               self.num_draft_tokens - before.num_draft_tokens,
                               self.num_accepted_tokens - before.num_accepted_tokens,
                               per_position)

    def copy(self) -> "SpecDecodeStats":
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_position))

    def summary(self) -> str:
        if not self.num_drafts:
            return "speculative decoding: no drafts verified"
        return (f"speculative decoding: {self.num_draft_tokens} draft tokens, "
                f"{self.num_accepted_tokens} accepted ({100 * self.acceptance_rate:.1f}%), "
                f"mean accepted length {self.mean_accepted_length:.2f}")
