"""vfmctl: the command-line interface to VFMOS."""
