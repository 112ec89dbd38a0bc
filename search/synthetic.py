"""A synthetic sensitivity profile with a real model's shapes, for tests and the search benchmark.

Gene names, parameter counts and byte costs follow a Llama-style model (SmolLM2-135M by default: 30
blocks, hidden 576, MLP 1536, 3 KV heads of 64) and the RTN quantiser's storage layout, so memory is
what the real profile would give. Sensitivities are made up (a per-gene scale x 4^-bits, larger in the
first and last blocks), which is enough to exercise the search; they are not measurements.
"""

from __future__ import annotations

import numpy as np

from profiling.profile import Profile
from profiling.quantizers.rtn import RTNQuantizer

SMOLLM2_SHAPES = (("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 192, 576), ("self_attn.v_proj", 192, 576),
                  ("self_attn.o_proj", 576, 576), ("mlp.gate_proj", 1536, 576), ("mlp.up_proj", 1536, 576),
                  ("mlp.down_proj", 576, 1536))
SMOLLM2_FIXED_PARAMS = 49152 * 576 + 61 * 576  # tied embedding + RMSNorm weights


def synthetic_profile(blocks: int = 30, granularity: str = "linear", bits=(2, 4, 8, 16), seed: int = 0,
                      shapes=SMOLLM2_SHAPES, fixed_params: int = SMOLLM2_FIXED_PARAMS, group_size: int = 64,
                      model_id: str = "synthetic/SmolLM2-135M-shapes") -> Profile:
    rng = np.random.default_rng(seed)
    bits = sorted(int(b) for b in bits)
    q = RTNQuantizer(group_size, tuple(str(b) for b in bits))
    names, gene_blocks, params, cost, sens = [], [], [], [], []
    for b in range(blocks):
        edge = 3.0 if b in (0, blocks - 1) else 1.0
        linears = []  # (name, params, cost per bits, sensitivity per bits)
        for name, o, i in shapes:
            scale = edge * rng.lognormal(0.0, 0.8) * o * i / 1e6
            linears.append((f"layers.{b}.{name}", o * i, [q.weight_bytes(str(w), o, i) for w in bits],
                            [0.0 if w == 16 else scale * 16.0 * 4.0 ** -w for w in bits]))
        if granularity == "block":
            linears = [(f"block.{b}", sum(x[1] for x in linears), np.sum([x[2] for x in linears], axis=0).tolist(),
                        np.sum([x[3] for x in linears], axis=0).tolist())]
        for name, n_params, c, s in linears:
            names.append(name)
            gene_blocks.append(b)
            params.append(n_params)
            cost.append(c)
            sens.append(s)
    return Profile(
        model_id=model_id, model_fingerprint=f"synthetic-{blocks}-{seed}", corpus_source="synthetic",
        corpus_fingerprint="synthetic", calibration_tokens=0, quantizer=q.settings(), granularity=granularity,
        metric="kl", qtypes=[str(b) for b in bits], qtype_bits=[float(b) for b in bits], gene_names=names, gene_blocks=gene_blocks, gene_params=params,
        cost_bytes=np.array(cost, dtype=np.int64), fixed_bytes=2 * fixed_params, base_loss=2.5,
        sensitivity=np.array(sens, dtype=np.float64), extra={"synthetic": True})
