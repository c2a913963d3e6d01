"""Training loops of one's own on the library API alone (no import of :mod:`pr2_megatron.rl`)."""
