"""Vision towers that several model families build on: SigLIP (Gemma 3, LLaVA-OneVision,
MiniCPM-V, DeepSeek-VL2, and under Mllama's and CLIP's encoders), CLIP (LLaVA) and Mllama's
tiled tower. A family's own projector or resampler stays in its model file."""
