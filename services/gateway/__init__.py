"""vfm-gatewayd: the OpenAI-compatible HTTP door to VFMOS, a client of the kernel like any app."""
