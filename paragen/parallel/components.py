"""The components of a diffusers pipeline that paragen treats alike, by attribute name."""

DENOISERS = ("unet", "transformer", "transformer_2")  # Wan2.2 has a second transformer for the low-noise steps
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
MODELS = DENOISERS + TEXT_ENCODERS  # nearly all of a pipeline's weights and compute
