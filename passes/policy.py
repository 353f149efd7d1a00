"""Which linears run in FP8: DeepSeek-V3's recipe, adjustable by fnmatch patterns on weight names.

DeepSeek-V3 (tech report, section 3.3) keeps the embedding, the output head, the MoE gating, the
normalizations and the attention operators in higher precision, and runs the linears of attention
(q_a/q_b or q, kv_a_proj_with_mqa, kv_b, o) and of the dense, shared and routed expert FFNs in FP8.
The MTP module's eh_proj and shared head count as embedding/output-head side and stay high precision.

`--policy '+*.o_proj,-model.layers.0.*'`: each comma-separated pattern adds (`+`, the default) or removes
(`-`) the linears whose weight name matches, in order, starting from the default set. A pattern matches
a weight name with or without its `.weight` suffix. A pattern that matches no linear is an error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from dsv3c.errors import UserError

DEFAULT_FP8 = (
    "*.self_attn.q_proj.weight",
    "*.self_attn.q_a_proj.weight",
    "*.self_attn.q_b_proj.weight",
    "*.self_attn.kv_a_proj_with_mqa.weight",
    "*.self_attn.kv_b_proj.weight",
    "*.self_attn.o_proj.weight",
    "*.mlp.gate_proj.weight",
    "*.mlp.up_proj.weight",
    "*.mlp.down_proj.weight",
    "*.mlp.shared_experts.*_proj.weight",
    "*.mlp.experts.*_proj.weight",
)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.removesuffix(".weight"), pattern)


@dataclass(frozen=True)
class Policy:
    rules: tuple[tuple[bool, str], ...] = ()  # (add?, pattern), applied in order after the defaults
    defaults: tuple[str, ...] = DEFAULT_FP8

    @classmethod
    def parse(cls, text: str | None) -> Policy:
        rules = []
        for raw in (text or "").split(","):
            item = raw.strip()
            if not item:
                continue
            add = not item.startswith("-")
            pattern = item.lstrip("+-").strip()
            if not pattern:
                raise UserError(f"--policy: '{item}' has no pattern; write e.g. '+*.o_proj' or '-model.layers.0.*'")
            rules.append((add, pattern))
        return cls(tuple(rules))

    def selects(self, name: str) -> bool:
        chosen = any(_matches(name, p) for p in self.defaults)
        for add, pattern in self.rules:
            if _matches(name, pattern):
                chosen = add
        return chosen

    def check(self, names: Iterable[str]) -> None:
        """UserError naming the first pattern that matches none of the linears `names`."""
        names = sorted(set(names))
        for add, pattern in self.rules:
            if not any(_matches(n, pattern) for n in names):
                example = ", ".join(names[:3])
                raise UserError(
                    f"--policy: '{'+' if add else '-'}{pattern}' matches no linear of this export "
                    f"(linears are named like {example}, ...; patterns use fnmatch: * ? [..])"
                )

    def to_dict(self) -> dict[str, list[str]]:
        return {"defaults": list(self.defaults), "rules": [("+" if a else "-") + p for a, p in self.rules]}
