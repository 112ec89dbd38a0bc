"""Shipping a genome: GGUF files for llama.cpp (the ggml quantiser) and packed checkpoints (RTN).

GGUF, run in llama.cpp:

- :mod:`.gguf_layout`: which tensors a Llama-family model's GGUF holds, their GGUF names and shapes,
  a genome resolved to one type per tensor, and the exact byte size of the file, without writing it.
- :mod:`.gguf_metadata`: the file's key/value metadata (hyper-parameters, tokenizer), copied from the
  model's own GGUF or taken from gguf-py's converter classes.
- :mod:`.gguf_writer`: writes the file, atomically, streaming one tensor at a time.
- :mod:`.gguf_weights`: reads a GGUF's weights back into the PyTorch model.
- :mod:`.llamacpp`: loads a GGUF in llama.cpp (llama-cpp-python), generates text, returns logits,
  measures perplexity and KL, and runs ``llama_model_quantize`` for the preset baselines.
- :mod:`.presets`: llama.cpp's Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K and Q4_0 as genomes.

Packed PyTorch checkpoints (RTN), run by EMPAS itself:

- :mod:`.packed_codec` (bit packing), :mod:`.packed_modules` (``PackedLinear`` and the 16-bit rest),
  :mod:`.packing` (model surgery), :mod:`.checkpoint` (folders written and loaded),
  :mod:`.generation`, :mod:`.measure` (a fresh process per measurement), :mod:`.serve` (HTTP).

Nothing here is imported by the rest of EMPAS at start-up: llama-cpp-python is loaded only when a
function that needs it is called.
"""
