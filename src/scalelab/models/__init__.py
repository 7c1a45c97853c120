"""The GPT model family, its parametrizations (SP, μP, depth-μP) and its FLOP/parameter accounting."""
