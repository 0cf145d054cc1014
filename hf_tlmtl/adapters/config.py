"""What an adapter is, as one value: :class:`AdapterConfig` (method, rank, alpha, dropout, targets, name).

The dataclass itself imports nothing of peft, so training arguments and model preparation can carry and
check it on paths that never attach an adapter; :meth:`AdapterConfig.peft_config` builds peft's own config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

METHODS: tuple[str, ...] = ("lora", "loha", "lokr", "ia3")
"""Valid values of ``method`` / ``MultiTaskTrainingArguments.lora_method``."""


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter's settings, checked when made.

    Args:
        r: Rank (LoRA, LoHa, LoKr; ignored by ``ia3``).
        alpha: Scaling numerator (``alpha / r``; ignored by ``ia3``).
        dropout: LoRA dropout / LoHa-LoKr module dropout (ignored by ``ia3``).
        target_modules: ``"auto"``, or names, suffixes or a regex of backbone layers (a comma-separated
            string is split); see :func:`hf_tlmtl.adapters.resolve_target_modules`.
        method: One of :data:`METHODS`.
        adapter_name: Name of this adapter; several named adapters share one backbone.

    Example:
        >>> AdapterConfig(r=4, alpha=8).method, AdapterConfig(method="ia3").adapter_name
        ('lora', 'default')
        >>> AdapterConfig(r=0)
        Traceback (most recent call last):
        ...
        ValueError: r (the adapter rank) must be an int >= 1, got 0.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | Sequence[str] = "auto"
    method: str = "lora"
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown adapter method {self.method!r}; valid methods: {sorted(METHODS)}.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the adapter rank) must be an int >= 1, got {self.r!r}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def peft_config(self, targets: list[str], heads: list[str]) -> Any:
        """peft's config for this method on resolved ``targets``, with ``heads`` as ``modules_to_save``."""
        import peft  # peft only when an adapter is built

        if self.method == "lora":
            return peft.LoraConfig(
                r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, modules_to_save=heads
            )
        if self.method == "loha":
            return peft.LoHaConfig(
                r=self.r, alpha=self.alpha, module_dropout=self.dropout, target_modules=targets, modules_to_save=heads
            )
        if self.method == "lokr":
            return peft.LoKrConfig(
                r=self.r, alpha=self.alpha, module_dropout=self.dropout, target_modules=targets, modules_to_save=heads
            )
        # (IA)^3 learns one scaling vector per layer: no rank, alpha or dropout. MLP output layers (fc2)
        # scale their input (the hidden activations), as the paper does for feed-forward blocks.
        feedforward = [t for t in targets if t.endswith("fc2")]
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, modules_to_save=heads)
