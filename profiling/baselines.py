"""Baselines to measure a search's genomes against, as per-weight genomes.

RTN: dense, uniform 8/4/3/2-bit and a llama.cpp Q4_K_M-style mix. (For the ggml quantiser the
baselines are llama.cpp's own presets, :mod:`profiling.deploy.presets`.)
"""

from __future__ import annotations

from typing import Iterable

from .genome import Genome
from .inventory import Inventory
from .quantizers.rtn import UNQUANTIZED_BITS, qtype_bits

UNIFORM_BASELINE_BITS = (8, 4, 3, 2)
BASELINES = ("dense",) + tuple(f"uniform-{b}" for b in UNIFORM_BASELINE_BITS) + ("q4_k_m-mix",)
#: Name fragments of the layers the Q4_K_M-style mix raises (llama.cpp's attn_v and ffn_down).
V_PROJ_NAMES = ("v_proj", ".wv", "attn.v", ".value")
DOWN_PROJ_NAMES = ("down_proj", "dense_4h_to_h", ".w2", ".fc2", "mlp.c_proj")
Q4_K_M_LOW_BITS, Q4_K_M_HIGH_BITS = 4, 6


def uniform_genome(inventory: Inventory, bits: int, name: str | None = None) -> Genome:
    """Every linear at ``bits``-bit RTN (16: unquantised, "dense")."""
    weights = inventory.weights
    label = name or ("dense" if bits == UNQUANTIZED_BITS else f"uniform-{bits}")
    note = "all linears unquantised" if bits == UNQUANTIZED_BITS else f"every linear at {bits}-bit RTN"
    return Genome(name=label, weights=weights, qtypes=tuple([str(int(bits))] * len(weights)), kind="baseline",
                  note=note)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between.

    Integer division as in llama.cpp's C++ (``7 * n / 8`` rounds down), which is what "the Q4_K_M
    mix" means in practice; on 30 layers: blocks 0-2, 5, 8, ..., 23 and 26-29.
    """
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def q4_k_m_genome(inventory: Inventory, low_bits: int = Q4_K_M_LOW_BITS,
                  high_bits: int = Q4_K_M_HIGH_BITS) -> Genome:
    """The llama.cpp Q4_K_M-style mix, always per linear: 4-bit everywhere, the attention value
    projection and the MLP down projection at 6 bits on the blocks :func:`use_more_bits` picks.

    Built from the linears of any inventory: at block granularity one gene holds a whole block, so the
    mix cannot be a block genome; it is measured per linear all the same. Differences from llama.cpp:
    RTN with fp16 scale and zero per group (not K-quants' super-blocks), and the embedding/LM head stay
    at 16 bits like every non-gene parameter (llama.cpp stores the output at Q6_K).
    """
    linears = inventory.weights
    n_blocks = inventory.n_blocks
    bits, raised = [], 0
    for lin in linears:
        name = "." + lin.path
        special = name.endswith(V_PROJ_NAMES) or name.endswith(DOWN_PROJ_NAMES)
        high = special and use_more_bits(lin.block, n_blocks)
        raised += high
        bits.append(str(high_bits if high else low_bits))
    if not any(("." + lin.path).endswith(V_PROJ_NAMES + DOWN_PROJ_NAMES) for lin in linears):
        raise ValueError("the Q4_K_M-style mix needs separate attention value (v_proj) and MLP down "
                         "(down_proj) layers; this architecture has none: skip it or use uniform baselines")
    note = (f"llama.cpp Q4_K_M-style: {low_bits}-bit, v_proj/down_proj at {high_bits}-bit on "
            f"{sum(use_more_bits(i, n_blocks) for i in range(n_blocks))}/{n_blocks} blocks ({raised} linears); "
            f"per-linear (no block genome can express it)")
    return Genome(name="q4_k_m-mix", weights=linears, qtypes=tuple(bits), kind="baseline", note=note)


def baseline_genomes(inventory: Inventory, names: Iterable[str] = BASELINES) -> list[Genome]:
    """RTN baselines by name: ``dense``, ``uniform-B`` (B in 2-8) and ``q4_k_m-mix``."""
    out = []
    for name in names:
        if name == "dense":
            out.append(uniform_genome(inventory, UNQUANTIZED_BITS))
        elif name.startswith("uniform-") and name[8:].isdigit():
            out.append(uniform_genome(inventory, qtype_bits(name[8:])))
        elif name == "q4_k_m-mix":
            out.append(q4_k_m_genome(inventory))
        else:
            raise ValueError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    return out
