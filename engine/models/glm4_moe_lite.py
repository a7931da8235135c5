"""GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's blocks (multi-head latent attention, grouped sigmoid
routing with a correction bias, shared experts) with the dense layers listed per layer in
`mlp_layer_types` ("dense" | "sparse", default: the first dense) instead of first_k_dense_replace.

Shapes: as engine/models/deepseek_v3.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from engine.decoder import Block, CausalLM
from engine.errors import UnsupportedArchitectureError
from engine.layers import MLP
from engine.models import Architecture
from engine.models.deepseek_v3 import DeepseekV3Args, LatentAttention, moe_or_mlp, mtp_layers


@dataclass(frozen=True)
class Glm4MoeLiteArgs(DeepseekV3Args):
    dense_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Glm4MoeLiteArgs:
        factor = (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        if float(factor) != 1.0:
            raise UnsupportedArchitectureError(
                f"This glm4_moe_lite checkpoint sets partial_rotary_factor={factor}; the engine rotates all "
                "qk_rope_head_dim dims of latent attention."
            )
        layers = int(c["num_hidden_layers"])
        kinds = c.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
        if len(kinds) != layers or not set(kinds) <= {"dense", "sparse"}:
            raise UnsupportedArchitectureError(
                f"mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers; got {kinds}."
            )
        # The routing is always V3's (sigmoid with a correction bias); the dense layers come from the list.
        base = DeepseekV3Args.from_config({**c, "first_k_dense_replace": 0, "scoring_func": "sigmoid"})
        # The MTP layer after the last one is in the releases whether or not config.json counts it.
        base = replace(base, num_nextn_predict_layers=int(c.get("num_nextn_predict_layers") or 1))
        return cls(**vars(base), dense_layers=tuple(i for i, kind in enumerate(kinds) if kind == "dense"))


def build(args: Glm4MoeLiteArgs) -> CausalLM:
    blocks = []
    for i in range(args.num_layers):
        mlp = MLP(args.hidden_size, args.intermediate_size) if i in args.dense_layers else moe_or_mlp(args, i)
        blocks.append(Block(LatentAttention(args), mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM.assemble(args, blocks, rope_dim=args.qk_rope_head_dim)


ARCHITECTURE = Architecture(
    args_from_config=Glm4MoeLiteArgs.from_config,
    build=build,
    ignore=mtp_layers,
    keep_fp32=("e_score_correction_bias",),
)
