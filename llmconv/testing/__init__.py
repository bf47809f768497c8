"""What llmconv's tests (tests/) and benchmarks (bench/) share, in the style of numpy.testing:
checkpoint and GGUF builders, the outside oracles' wrappers, the fuzzers' strategies and checks.

`import llmconv` does not import this package, and importing it imports nothing heavy: each
module brings its own dependencies (torch, hypothesis, llama-cpp-python) when it is imported.
The modules read the source tree's fixtures/ (FIXTURES), so they serve a checkout, not an
installed wheel.

    procstat         run a command, sample its peak anonymous memory
    gguf_build       GGUF files built byte by byte, with where every field is
    llama_gguf_util  f32 llama GGUFs for llama.cpp's quantizer; ggml_quantize_chunk via ctypes
    moe_synth        tiny Mixtral checkpoints (HF layout) and a float64 reference forward pass
    fuzz_util        a wall-clock limit per fuzz input
    fuzz_gguf        the GGUF reader fuzzer: seed files, mutations, the check of one input
    fuzz_inputs      the checkpoint-JSON fuzzer: targets and their checkpoints, the check of one input
    json_mutations   its structure-aware mutations of config.json, params.json, tokenizer*.json
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
