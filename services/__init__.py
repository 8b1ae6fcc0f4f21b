"""User-space services of VFMOS: model, data and trust daemons."""
